"""Public attributes a caller may set on a handle (``pool.wait_timeout``, ``pool.fail_fast``,
``log.wait_timeout``), checked when they are set.

A plain attribute took any value, and a wrong one failed much later, deep inside a wait that
needed it (``TypeError: unsupported operand type(s) for +: 'float' and 'str'`` at the first
pin that waited for a frame), or silently meant something else (``fail_fast = "no"`` is true).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar, overload

from .errors import InvalidArgument

__all__ = ["Flag", "Seconds"]

T = TypeVar("T")


class _Checked(ABC, Generic[T]):
    """A data descriptor that keeps its value in ``_<name>`` once :meth:`_convert` accepts it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name, self._slot = name, "_" + name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _Checked[T]: ...
    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> T: ...
    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj, self._slot)

    def __set__(self, obj: object, value: T) -> None:
        setattr(obj, self._slot, self._convert(value))

    @abstractmethod
    def _convert(self, value: object) -> T:
        """The value to keep, or InvalidArgument naming the attribute."""


class Seconds(_Checked[float]):
    """A timeout in seconds: a finite number, 0 or more (kept as a float)."""

    def _convert(self, value: object) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise InvalidArgument(f"{self._name} must be a number of seconds >= 0, not {value!r}")
        return float(value)


class Flag(_Checked[bool]):
    """An on/off setting: True or False only."""

    def _convert(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise InvalidArgument(f"{self._name} must be True or False, not {value!r}")
        return value
