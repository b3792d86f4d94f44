"""Name -> object registries for methods, metrics, suites and presets (``python -m benchmark list``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownEntry(LookupError):
    """A name that is not registered; the message lists the valid ones."""


class Registry(Generic[T]):
    """A small ordered name -> entry map whose entries document themselves by their docstring."""

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint  # appended to the message for an unknown name
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownEntry(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}"
                               + (f" ({self.hint})" if self.hint else "")) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def summary(self) -> list[tuple[str, str]]:
        """(name, first docstring line) per entry."""
        out = []
        for name, obj in self._entries.items():
            # data entries (suites) describe themselves by a title; code entries by their docstring
            doc = (getattr(obj, "title", None) or getattr(obj, "__doc__", None) or "").strip().splitlines()
            out.append((name, doc[0] if doc else ""))
        return out


METHODS: Registry[Any] = Registry("method", hint="a method from outside this repository needs --plugin MODULE_OR_FILE, "
                                            "BENCHMARK_PLUGINS or an installed brainmri.methods entry point")
METRICS: Registry[Any] = Registry("metric")
SUITES: Registry[Any] = Registry("suite")
PRESETS: Registry[Any] = Registry("preset")
