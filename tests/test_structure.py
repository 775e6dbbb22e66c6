"""The package keeps its shape: no import cycles, no module over the size limit, no
function-local imports (issue 11).

Imports are read with ``ast`` from the source, not from ``sys.modules``, so every import
counts wherever it is written: at module level, inside a function (a cycle "broken" by a
function-local import is still a cycle of the design), in a ``try``. Only imports under
``if TYPE_CHECKING:`` are left out: they never run, and annotations naming each other's types
(``errors`` names ``SyncResult``, the pool names ``EnvCore``) are not a dependency of the code.
An edge goes to the module an import names (``from .layout import WORD`` is an edge to
``region.layout``; ``from . import _io`` to ``aiodbenv._io``); the implicit import of a parent
package's ``__init__`` is not an edge.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import aiodbenv

PACKAGE_DIR = Path(aiodbenv.__file__).parent

#: Most lines a module of aiodbenv may have.
MAX_LINES = 500

#: Modules excused from the rules above. Empty: the pool and the environment were both
#: restructured (issue 11); a module that needs an exemption must argue for it here.
UNTIL_POOL_RESTRUCTURE: frozenset[str] = frozenset()

#: Function-local imports that stay, each with the reason no module-level import will do.
LOCAL_IMPORTS_ALLOWED: Mapping[tuple[str, str], str] = {
    ("aiodbenv.region.mutex", "aiodbenv._speedups"): (
        "the compiled accelerator is optional (absent without a C compiler, skipped with "
        "AIODBENV_MUTEX=abi): tried at load, with the ABI-mode fallback"
    ),
    ("aiodbenv.region.mutex", "cffi"): "needed only by the ABI-mode fallback",
    ("aiodbenv.mpool.hot", "aiodbenv._hot"): (
        "the compiled hot path is optional (absent without a C compiler, skipped with "
        "AIODBENV_HOT=python or AIODBENV_MUTEX=abi): tried at load, with the Python hot path "
        "as the fallback"
    ),
    ("aiodbenv.metrics", "prometheus_client.core"): (
        "an optional extra: importing aiodbenv.metrics must work without it; Collector fails "
        "at construction when it is missing"
    ),
}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as written in ``module`` at ``line``."""

    module: str
    target: str
    line: int
    local: bool  # inside a function or method


def module_name(path: Path, root: Path) -> str:
    """``aiodbenv/region/layout.py`` -> ``aiodbenv.region.layout`` (``__init__`` -> package)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path) -> dict[str, Path]:
    """Every Python module of the package in ``root`` by dotted name."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def extension_modules(root: Path) -> set[str]:
    """The compiled modules of the package (``_speedups.abi3.so`` -> ``aiodbenv._speedups``):
    an import of one names a module, not its package, though it has no source to read."""
    # The accelerator is named even where it is not built (a source checkout): its import is
    # then still an import of a module, not of the package's __init__.
    out = {f"{root.name}._speedups"}
    for path in root.rglob("*.so"):
        stem = path.name.split(".", 1)[0]
        out.add(module_name(path.with_name(stem + ".py"), root))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, local: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:  # the else branch runs
                yield from _walk(sub, local)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, local
        inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _walk(child, inner)


def imports_of(name: str, path: Path, known: Iterable[str]) -> list[Import]:
    """The imports ``path`` (module ``name``) makes, resolved to dotted targets: a submodule
    where the import names one, else the module it imports from."""
    modules = set(known)
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node, local in _walk(ast.parse(path.read_text(), str(path)), False):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.append(sub if sub in modules else source)
        out += [Import(name, t, node.lineno, local) for t in dict.fromkeys(targets)]
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (TYPE_CHECKING-only left out)."""
    modules = package_modules(root)
    known = set(modules) | extension_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for imp in imports_of(name, path, known):
            if imp.target in modules and imp.target != name:
                graph[name].add(imp.target)
    return graph


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import cycles: every strongly connected component of more than one module (Tarjan's
    algorithm, iterative so a deep package cannot hit the recursion limit), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return sorted(out)


def oversized(root: Path) -> dict[str, int]:
    """The modules over :data:`MAX_LINES` lines, with their line counts."""
    sizes = {n: len(p.read_text().splitlines()) for n, p in package_modules(root).items()}
    return {n: lines for n, lines in sizes.items() if lines > MAX_LINES}


def local_imports(root: Path) -> list[Import]:
    """Every import written inside a function (TYPE_CHECKING-only ones left out)."""
    modules = package_modules(root)
    known = set(modules) | extension_modules(root)
    return [i for n, p in modules.items() for i in imports_of(n, p, known) if i.local]


# -- the guards -----------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph(PACKAGE_DIR))
    # A cycle wholly inside the pool modules being restructured waits for that work.
    bad = [c for c in cycles if not set(c) <= UNTIL_POOL_RESTRUCTURE]
    assert not bad, f"import cycles among aiodbenv's modules: {bad}"


def test_no_module_over_the_size_limit() -> None:
    over = {n: lines for n, lines in oversized(PACKAGE_DIR).items()}
    over = {n: lines for n, lines in over.items() if n not in UNTIL_POOL_RESTRUCTURE}
    assert not over, f"modules over {MAX_LINES} lines (split them by concept): {over}"


def test_no_function_local_imports() -> None:
    found = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in local_imports(PACKAGE_DIR)
        if i.module not in UNTIL_POOL_RESTRUCTURE
        and (i.module, i.target) not in LOCAL_IMPORTS_ALLOWED
    ]
    assert not found, f"function-local imports (import at module level): {found}"


def test_the_exemptions_are_still_needed() -> None:
    # An exemption that no longer exempts anything is removed, so the lists cannot only grow.
    over = oversized(PACKAGE_DIR)
    in_cycles = {m for c in find_cycles(import_graph(PACKAGE_DIR)) for m in c}
    importing = {i.module for i in local_imports(PACKAGE_DIR)}
    idle = UNTIL_POOL_RESTRUCTURE - set(over) - in_cycles - importing
    assert not idle, f"exempt but breaking no rule any more: {sorted(idle)}"
    local = {(i.module, i.target) for i in local_imports(PACKAGE_DIR)}
    for key, reason in LOCAL_IMPORTS_ALLOWED.items():
        assert reason
        assert key in local, f"{key[0]} no longer imports {key[1]} in a function"


# -- the guards can fail --------------------------------------------------------------------


def _package(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cycle_finder_on_a_synthetic_package(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "from .a import A\n",
            "a.py": "from .b import B\nA = 1\n",
            "b.py": "B = 2\ndef f():\n    from .c import C  # function-local: still an edge\n",
            "c.py": "from . import a\nC = 3\n",
            "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n",
            "sub/__init__.py": "",
            "sub/e.py": "from ..d import x\nfrom .f import y\n",
            "sub/f.py": "from .e import z\n",
            "g.py": "import pkg.g2\n",
            "g2.py": "from pkg import g\n",
        },
    )
    graph = import_graph(root)
    assert graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.d"] == set()  # TYPE_CHECKING only
    assert graph["pkg.sub.e"] == {"pkg.d", "pkg.sub.f"}
    assert find_cycles(graph) == [
        ["pkg.a", "pkg.b", "pkg.c"],
        ["pkg.g", "pkg.g2"],
        ["pkg.sub.e", "pkg.sub.f"],
    ]
    assert [(i.module, i.target, i.line) for i in local_imports(root)] == [("pkg.b", "pkg.c", 3)]


def test_cycle_finder_on_a_copy_of_aiodbenv_with_a_cycle_added(tmp_path: Path) -> None:
    # The real package, copied, with one import added that closes a loop: layout is imported
    # by backing, so layout importing backing is a cycle the guard must name.
    copy = tmp_path / "aiodbenv"
    for path in [*PACKAGE_DIR.rglob("*.py"), *PACKAGE_DIR.rglob("*.so")]:
        dest = copy / path.relative_to(PACKAGE_DIR)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
    assert not [c for c in find_cycles(import_graph(copy)) if not set(c) <= UNTIL_POOL_RESTRUCTURE]
    layout = copy / "region" / "layout.py"
    layout.write_text(layout.read_text() + "\n\ndef _late() -> None:\n    from . import backing\n")
    cycles = [c for c in find_cycles(import_graph(copy)) if not set(c) <= UNTIL_POOL_RESTRUCTURE]
    assert any({"aiodbenv.region.layout", "aiodbenv.region.backing"} <= set(c) for c in cycles)
    # The same added import is a function-local import the third guard names.
    assert ("aiodbenv.region.layout", "aiodbenv.region.backing") in {
        (i.module, i.target) for i in local_imports(copy)
    }


@pytest.mark.parametrize("lines", [MAX_LINES, MAX_LINES + 1])
def test_size_check_on_a_synthetic_package(tmp_path: Path, lines: int) -> None:
    root = _package(tmp_path, {"__init__.py": "", "big.py": "x = 1\n" * lines})
    assert oversized(root) == ({"pkg.big": lines} if lines > MAX_LINES else {})
