"""A name -> builder table, one per config group, so that a Hydra group maps to one folder of code."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actmem.errors import ConfigError


@dataclass
class Entry:
    name: str
    fn: Callable
    schema: type | None = None  # structured-config dataclass for this option (Hydra ConfigStore)
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, schema: type | None = None, **meta):
        """Decorator: `@MODELS.register("resnet20", input="cifar")`."""

        def deco(fn):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(name, fn, schema, meta)
            return fn

        return deco

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ConfigError(
                f"Unknown {self.kind} {name!r}. Valid {self.kind} names: {', '.join(self.names())}."
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries
