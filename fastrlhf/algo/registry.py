"""A name -> entry table for the pluggable pieces of the RL math (advantage estimators, policy losses)."""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``register(name, entry)`` once per name; ``get(name)`` with an error that lists the names under the
    config key ``key`` (e.g. ``advantage_estimator``)."""

    def __init__(self, what: str, key: str):
        self.what, self.key = what, key
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"{self.key} must be one of {self.names()}, got {name!r}")
        return self._entries[name]
