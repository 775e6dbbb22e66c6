"""The public names are exported and documented, and the errors keep their meaning."""

from __future__ import annotations

import errno
import inspect
import pickle

import pytest

import aiodbenv
import aiodbenv.errors


def test_all_names_exist_and_are_documented() -> None:
    for name in aiodbenv.__all__:
        obj = getattr(aiodbenv, name)
        assert inspect.getdoc(obj), f"aiodbenv.{name} has no docstring"


def test_public_methods_are_documented() -> None:
    classes = [
        getattr(aiodbenv, n) for n in aiodbenv.__all__ if isinstance(getattr(aiodbenv, n), type)
    ]
    assert aiodbenv.Pool in classes and aiodbenv.PoolFile in classes
    for cls in classes:
        for name, member in vars(cls).items():
            if name.startswith("_") or not (callable(member) or isinstance(member, property)):
                continue
            assert inspect.getdoc(member), f"{cls.__name__}.{name} has no docstring"


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
