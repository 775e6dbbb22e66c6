"""The public names are exported and documented, and the errors keep their meaning."""

from __future__ import annotations

import errno
import functools
import importlib
import inspect
import pickle
import pkgutil
import types
from collections.abc import Iterator

import pytest

import aiodbenv
import aiodbenv.errors

#: Packages that implement the public names; what they export is re-exported from aiodbenv.
IMPLEMENTATION = {"aiodbenv.log", "aiodbenv.mpool", "aiodbenv.region"}


def public_modules() -> list[types.ModuleType]:
    """aiodbenv and its public submodules (those in ``__all__``, and any other importable
    submodule whose name has no leading underscore and is not an implementation package)."""
    found = {"aiodbenv": aiodbenv}
    for info in pkgutil.iter_modules(aiodbenv.__path__, "aiodbenv."):
        last = info.name.rsplit(".", 1)[1]
        if last.startswith("_") or info.name in IMPLEMENTATION:
            continue
        try:
            found[info.name] = importlib.import_module(info.name)
        except ImportError as err:  # an optional extra (say prometheus_client) not installed
            if err.name is None or err.name.split(".")[0] == "aiodbenv":
                raise
    return list(found.values())


def own_doc(obj: object) -> str:
    """The docstring ``obj`` itself has: not inherited, not one Python made up."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return ""
    if isinstance(obj, type):
        # dataclasses and NamedTuples without a docstring get their signature as one.
        if doc.startswith(obj.__name__ + "(") and "\n" not in doc.strip():
            return ""
        if any(doc == getattr(base, "__doc__", None) for base in obj.__mro__[1:]):
            return ""
    return doc


def public_api() -> Iterator[tuple[str, object, str]]:
    """(dotted name, object, module it is exported from) for every public name."""
    for module in public_modules():
        assert hasattr(module, "__all__"), f"{module.__name__} has no __all__"
        for name in module.__all__:
            yield f"{module.__name__}.{name}", getattr(module, name), module.__name__


def test_public_modules_are_the_expected_ones() -> None:
    names = {m.__name__ for m in public_modules()}
    assert {"aiodbenv", "aiodbenv.errors"} <= names
    assert not {n for n in names if "._" in n}


def test_all_names_exist_report_a_public_module_and_are_documented() -> None:
    for dotted, obj, module in public_api():
        if isinstance(obj, types.ModuleType):
            assert obj.__name__ in {m.__name__ for m in public_modules()}, dotted
            assert own_doc(obj), f"{dotted} (a module) has no docstring"
            continue
        if not (isinstance(obj, type) or callable(obj)):
            continue  # a constant: documented where it is defined
        # Docs, reprs and tracebacks name the public home, never a private module.
        assert obj.__module__ in {"aiodbenv", module}, f"{dotted}.__module__ is {obj.__module__}"
        assert own_doc(obj), f"{dotted} has no docstring"


def test_public_methods_and_properties_are_documented() -> None:
    classes = [(d, obj) for d, obj, _ in public_api() if isinstance(obj, type)]
    assert {aiodbenv.Pool, aiodbenv.PoolFile, aiodbenv.Env} <= {c for _, c in classes}
    undocumented = []
    for dotted, cls in classes:
        for name in dir(cls):
            if name.startswith("_"):
                continue
            # Check it where it is defined, if aiodbenv defines it (not object's, Exception's).
            owner = next((k for k in cls.__mro__ if name in vars(k)), None)
            if owner is None or not owner.__module__.startswith("aiodbenv"):
                continue
            member = vars(owner)[name]
            if isinstance(member, staticmethod | classmethod):
                member = member.__func__
            if not (
                inspect.isfunction(member)
                or isinstance(member, property | functools.cached_property)
            ):
                continue  # data: fields, slots, class constants
            if not own_doc(member):
                undocumented.append(f"{dotted}.{name}")
    assert not undocumented, f"undocumented public members: {sorted(set(undocumented))}"


def test_errors_module_exports_every_error() -> None:
    for name in aiodbenv.errors.__all__:
        cls = getattr(aiodbenv.errors, name)
        assert issubclass(cls, aiodbenv.AiodbenvError)
        assert getattr(aiodbenv, name) is cls


@pytest.mark.parametrize(
    "cls,code,base",
    [
        (aiodbenv.InvalidArgument, errno.EINVAL, ValueError),
        (aiodbenv.ConfigError, errno.EINVAL, ValueError),
        (aiodbenv.EnvNotFound, errno.ENOENT, FileNotFoundError),
        (aiodbenv.PermissionDenied, errno.EACCES, PermissionError),
        (aiodbenv.NoSpace, errno.ENOSPC, OSError),
        (aiodbenv.CacheFull, errno.ENOMEM, MemoryError),
        (aiodbenv.Busy, errno.EBUSY, aiodbenv.AiodbenvError),
        (aiodbenv.TryAgain, errno.EAGAIN, aiodbenv.AiodbenvError),
        (aiodbenv.RunRecovery, errno.EIO, aiodbenv.AiodbenvError),
    ],
)
def test_errors_carry_errno_and_python_base(cls: type, code: int, base: type) -> None:
    err = cls("something went wrong")
    assert err.errno == code
    assert isinstance(err, base) and isinstance(err, aiodbenv.AiodbenvError)
    assert "something went wrong" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is cls and again.errno == code and str(again) == str(err)


def test_berkeley_db_codes() -> None:
    assert aiodbenv.RunRecovery.db_code == -30973
    assert aiodbenv.VersionMismatch.db_code == -30969
    assert aiodbenv.Incomplete.db_code is not None


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("aiodbenv").joinpath("py.typed").is_file()
