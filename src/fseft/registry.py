"""One generic registry (timm / peft style): ``register(name)``, ``get(name)``, ``names()``.

Unknown or duplicate names raise and list the valid ones; there is never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of objects of one kind (methods, backbones, templates, ...).

    Args:
        kind: What the registry holds, used in error messages ("adaptation method").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name``.

        Raises:
            ConfigError: if ``name`` is already registered.
        """
        if name in self._items:
            raise ConfigError(
                f"duplicate {self.kind} {name!r}; already registered: {', '.join(self.names())}"
            )
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(item: T) -> T:
            return self.add(name, item)

        return deco

    def get(self, name: str) -> T:
        """Return the item registered under ``name``.

        Raises:
            ConfigError: naming the valid choices when ``name`` is unknown.
        """
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
