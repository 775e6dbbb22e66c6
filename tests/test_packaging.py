"""What ships is what is tested: the wheel holds every module, the sdist the whole project.

The suite itself runs against an editable install, which sees the source tree whatever the
packaging says; these tests look at the built artifacts. They build an sdist and, from it, a
wheel with ``python -m build`` (the way a release is built), unless CI hands them the ones it
built and repaired (``AIODBENV_WHEEL`` and ``AIODBENV_SDIST``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGE = REPO / "aiodbenv"
#: Build inputs that live in the package directory but are not runtime modules.
BUILD_ONLY = {"aiodbenv/_speedups_build.py"} | {
    p.relative_to(PACKAGE.parent).as_posix()
    for p in (PACKAGE / "_csrc").rglob("*")
    if p.suffix in (".c", ".cdef")
}
#: Project directories the sdist carries whole (generated output excluded).
SDIST_DIRS = ("docs", "examples", "tests", "benchmarks")
#: What a checkout does not have: build and install output, caches, virtualenvs.
NOT_IN_A_CHECKOUT = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.py[cod]",
    "*.so",
    "*.o",
    "_speedups.c",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".build",
    "results",
)
SDIST_SKIP = re.compile(r"(^|/)(__pycache__|\.build|results)(/|$)|\.(py[cod]|so|o)$")


def source_modules(package: Path = PACKAGE) -> set[str]:
    """Every runtime module of the package in the tree, as wheel paths (aiodbenv/x/y.py)."""
    found = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).as_posix()
        if "__pycache__" not in rel and rel not in BUILD_ONLY:
            found.add(rel)
    return found


def missing_from(names: Iterable[str], expected: Iterable[str]) -> list[str]:
    """The expected paths that are not among an archive's ``names``."""
    have = set(names)
    return sorted(set(expected) - have)


def wheel_files(wheel: Path) -> list[str]:
    """The files in a wheel (auditwheel's repaired wheels also list the directories)."""
    with zipfile.ZipFile(wheel) as z:
        return [n for n in z.namelist() if not n.endswith("/")]


def compiler_available() -> bool:
    if os.environ.get("AIODBENV_NO_COMPILE") == "1":
        return False
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(wheel, sdist): CI's when it passes them, else built here from this tree."""
    wheel, sdist = os.environ.get("AIODBENV_WHEEL"), os.environ.get("AIODBENV_SDIST")
    if wheel and sdist:
        yield Path(wheel), Path(sdist)
        return
    out = tmp_path_factory.mktemp("dist")
    # From a copy of the tree as a fresh checkout has it: setuptools reads a stale
    # aiodbenv.egg-info/SOURCES.txt left by an earlier (editable) install into the sdist, and
    # would then ship a module the package configuration has lost as package data.
    src = out / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_IN_A_CHECKOUT))
    # The wheel is built from the sdist, as pip builds it for users without a wheel: a file
    # missing from the sdist then fails the wheel too. Build isolation fetches setuptools.
    r = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    (wheel_path,) = out.glob("*.whl")
    (sdist_path,) = out.glob("*.tar.gz")
    yield wheel_path, sdist_path


def test_every_module_is_in_the_wheel(artifacts: tuple[Path, Path]) -> None:
    wheel, _ = artifacts
    names = wheel_files(wheel)
    expected = source_modules()
    assert "aiodbenv/mpool/pool.py" in expected and "aiodbenv/region/mutex.py" in expected
    assert not missing_from(names, expected), f"{wheel.name} lacks {missing_from(names, expected)}"
    assert "aiodbenv/py.typed" in names


def test_wheel_ships_only_the_package(artifacts: tuple[Path, Path]) -> None:
    wheel, _ = artifacts
    names = wheel_files(wheel)
    for build_only in BUILD_ONLY:
        assert build_only not in names, f"{build_only} is a build script, not a runtime module"
    stray = [n for n in names if not n.startswith(("aiodbenv/", "aiodbenv-"))]
    assert not stray, f"the wheel installs more than the package: {stray}"
    licenses = [n for n in names if ".dist-info/licenses/" in n]
    assert [n.rsplit("/", 1)[1] for n in licenses] == ["LICENSE"]


def test_wheel_carries_the_accelerator_with_a_stable_abi_tag(
    artifacts: tuple[Path, Path],
) -> None:
    wheel, _ = artifacts
    names = wheel_files(wheel)
    if not compiler_available():
        # Without a compiler the accelerator is skipped and the wheel is pure Python.
        assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
        assert not [n for n in names if n.endswith(".so")]
        return
    assert "aiodbenv/_speedups.abi3.so" in names
    # The hot pin/unpin's extension types (aiodbenv.mpool.hot), built for the stable ABI too.
    assert "aiodbenv/_hot.abi3.so" in names
    # One wheel for every CPython >= 3.11: the stable ABI tag, and a Linux platform tag
    # (linux_* straight from the build, manylinux_* after CI's auditwheel repair).
    assert re.search(r"-cp311-abi3-(manylinux_\d+_\d+_|linux_)\w+\.whl$", wheel.name), wheel.name


def test_wheel_metadata(artifacts: tuple[Path, Path]) -> None:
    wheel, _ = artifacts
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        text = z.read(meta).decode()
    for classifier in (
        "Typing :: Typed",
        "Framework :: AsyncIO",
        "Operating System :: POSIX :: Linux",
    ):
        assert f"Classifier: {classifier}" in text
    assert "License-Expression: MIT" in text
    assert re.search(r"^Project-URL: Source, https://", text, re.M)
    # The library runs on any asyncio loop: uvloop is an extra, not a requirement.
    requires = re.findall(r"^Requires-Dist: (.*)$", text, re.M)
    assert not [r for r in requires if r.startswith("uvloop") and "extra ==" not in r]
    assert any(r.startswith("uvloop") and 'extra == "uvloop"' in r for r in requires)


def test_sdist_carries_the_project(artifacts: tuple[Path, Path]) -> None:
    _, sdist = artifacts
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    expected = {"LICENSE", "README.md", "pyproject.toml", "setup.py", "mkdocs.yml", *BUILD_ONLY}
    expected |= source_modules()
    for top in SDIST_DIRS:
        for path in (REPO / top).rglob("*"):
            rel = path.relative_to(REPO).as_posix()
            if path.is_file() and not SDIST_SKIP.search(rel):
                expected.add(rel)
    assert "docs/pool.md" in expected and "tests/conftest.py" in expected
    assert not missing_from(names, expected), f"{sdist.name} lacks {missing_from(names, expected)}"


def test_the_module_check_can_fail() -> None:
    # The check above on a wheel that lost a subpackage (the bug it guards against: a package
    # list that named aiodbenv and aiodbenv.region but not aiodbenv.mpool).
    expected = source_modules()
    without_mpool = [n for n in expected if not n.startswith("aiodbenv/mpool/")]
    assert "aiodbenv/mpool/__init__.py" in missing_from(without_mpool, expected)
    assert not missing_from(expected, expected)
