"""Registries of named things (fit modes, objectives, noise losses, parameterizations, ...).

Every named choice in tl-noise is looked up the same way, and an unknown name is refused with the
accepted names listed, at the moment it is given:

>>> colours = Registry("colour")
>>> @colours.register("red")
... def red() -> str:
...     return "#f00"
>>> colours.get("red")()
'#f00'
>>> colours.get("blue")
Traceback (most recent call last):
tl_noise.errors.TLNoiseValueError: colour='blue'; accepted: red
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from tl_noise.errors import TLNoiseValueError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects, in registration order; ``kind`` names the setting in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``."""

        def add(obj: T) -> T:
            if name in self._items:
                raise TLNoiseValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        """The object registered as ``name``; ValueError listing the accepted names otherwise."""
        if not isinstance(name, str) or name not in self._items:
            raise TLNoiseValueError(f"{self.kind}={name!r}; accepted: {', '.join(self._items)}")
        return self._items[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
