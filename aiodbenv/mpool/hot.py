"""The compiled hot path of ``PoolFile.get()``: the CPython extension types of
:mod:`aiodbenv._hot`, and the choice between them and the Python hot path (the glue is
:mod:`aiodbenv.mpool.hotpath`).

``async with f.get(p) as page`` on a cached page makes, in Python, a context object, two
coroutines, two cffi calls and a Page: about 3 µs. With :mod:`aiodbenv._hot` installed,
``f.get`` is the ``get`` of the file's :class:`HotFile` (bound once, as an instance attribute),
which returns a C context that is its own already-completed awaitable: its ``__aenter__`` pins
the page in C (hash, trylock, chain walk, pin counts, statistics, the page view) and its
``__aexit__`` unpins it in C. The bookkeeping itself is the cffi accelerator's
(``aiodb_pin_one_cache``, ``aiodb_unpin_at``), called through function pointers handed over by
:func:`configure`: one copy of that code and of its static state.

The compiled context calls back into Python (the functions below) only for what the Python
hit path would not do either: a miss, contention, a dead mutex holder, a corrupt chain, a
closed or forked file, a panicked environment, a bad or refused unpin, a dirty unpin (to count
dirty bytes) and a frame waiter to wake. ``get(p, create=True)``, ``get(p, latch=True)``,
:meth:`~aiodbenv.mpool.file.PoolFile.new`, :meth:`~aiodbenv.mpool.file.PoolFile.last` and the
explicit pin/unpin keep the Python forms, and so do memory-mapped files.

``AIODBENV_HOT=python`` (read at import) turns the compiled type off; so does
``AIODBENV_MUTEX=abi`` (no cffi accelerator to call into). Any other value than ``c`` or
``python`` is refused.
"""

from __future__ import annotations

import os
from typing import Any

from ..region.mutex import speedups

__all__ = ["COMPILED", "PageType", "module"]


def _load() -> Any:
    choice = os.environ.get("AIODBENV_HOT", "c").lower() or "c"
    if choice not in ("c", "python"):
        raise ImportError(f"AIODBENV_HOT must be 'c' or 'python', not {choice!r}")
    if choice == "python" or speedups is None:
        return None
    try:
        from .. import _hot  # type: ignore[attr-defined]
    except ImportError:
        return None  # not built (no compiler): the Python hot path runs
    return _hot


#: The compiled module :mod:`aiodbenv._hot`, or None when the Python hot path runs.
module: Any = _load()
#: True when ``PoolFile.get`` returns the compiled context (see the module's docstring).
COMPILED = module is not None
#: The compiled :class:`~aiodbenv.mpool.page.Page` (a final C type, methods included), or
#: None.
PageType: Any = module.Page if module is not None else None
