"""The compiled accelerator and its Python twins agree on the layout and on the page hash.

The list of layout values handed to the C code and the C enum that names them come from one
tuple (``aiodbenv.mpool.accel_layout.NAMES``); the C side refuses a list of another length.
The page hash is written once in Python (``cache.bucket_hash``) and once in C
(``aiodb_pin_one_cache``): a page pinned by the compiled hit path must sit in the bucket the
Python hash names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import aiodbenv
from aiodbenv.mpool import accel
from aiodbenv.mpool.accel_layout import NAMES, c_enum
from aiodbenv.mpool.cache import bucket_hash
from aiodbenv.region.mutex import ffi, speedups

from .conftest import REPO

compiled = pytest.mark.skipif(speedups is None, reason="the compiled accelerator is not in use")


def test_the_c_enum_is_generated_from_the_one_tuple_of_names() -> None:
    enum = c_enum()
    assert re.findall(r"L_(\w+)", enum) == [*NAMES, "COUNT"]
    script = Path(REPO, "aiodbenv", "_speedups_build.py").read_text()
    assert "c_enum()" in script
    parts = sorted(Path(REPO, "aiodbenv", "_csrc").glob("*.c"))
    assert parts, "no C source parts"
    build = "\n".join(p.read_text() for p in parts)
    assert "enum { L_" not in build, "a C part writes an enum of its own"
    used = set(re.findall(r"L\[L_(\w+)\]", build)) - {"COUNT"}  # L[L_COUNT]: the array
    assert used <= set(NAMES), f"names the C code uses but the tuple lacks: {used - set(NAMES)}"


def test_every_name_has_a_value_in_order() -> None:
    values = accel.layout_values()
    assert len(values) == len(NAMES)
    assert all(isinstance(v, int) and v >= 0 for v in values)


@compiled
def test_the_c_side_refuses_a_list_of_another_length() -> None:
    values = accel.layout_values()
    short = ffi.new("uint64_t[]", values[:-1])
    assert speedups.aiodb_set_layout(short, len(values) - 1) == 0
    longer = ffi.new("uint64_t[]", [*values, 0])
    assert speedups.aiodb_set_layout(longer, len(values) + 1) == 0
    # The right list is taken (the same values again: nothing changes for other tests).
    assert speedups.aiodb_set_layout(ffi.new("uint64_t[]", values), len(values)) == 1


@compiled
@pytest.mark.parametrize("ncache", [1, 3])
async def test_the_c_hit_path_hashes_as_the_python_helper(home: str, ncache: int) -> None:
    env = await aiodbenv.Env.open(home, create=True, cache_size=1 << 20, ncache=ncache)
    try:
        async with env.pool.open_file("h.db", create=True, page_size=4096) as f:
            for p in range(40):
                async with f.get(p, create=True):
                    pass
            core = env.pool._core
            for p in range(40):
                page = f._pin_hit(p)  # the compiled hit path, whole
                assert page is not None, f"page {p} should be a hit"
                try:
                    h = bucket_hash(f._fidx, p)
                    cache = core.caches[h % ncache]
                    assert page._cache is cache
                    assert page._bucket == (h // ncache) % cache.nbuckets
                    assert core.locate(f._fidx, p) == (cache, page._bucket)
                finally:
                    await f.unpin(page)
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)
