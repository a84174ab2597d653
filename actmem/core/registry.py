"""A name -> builder table, one per config group, so that a Hydra group maps to one folder of code.

Every group (dataset, model, strategy, optim, logger) is a Registry filled the same way: the group's
package imports all its modules with `discover`, and each module registers its options by existing.
An option's settings are its schema's fields (a dataclass, for groups with a schema per option) or
its builder's keyword arguments; `check_settings` refuses unknown ones the same way for every group.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from actmem.core.errors import ConfigError


@dataclass
class Entry:
    name: str
    fn: Callable
    schema: type | None = None  # structured-config dataclass for this option (Hydra ConfigStore)
    meta: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """{setting: default}: the schema's fields, else the builder's keyword arguments (those after
        its positional inputs)."""
        if self.schema is not None:
            return {f.name: f.default for f in dataclasses.fields(self.schema)}
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY or
                (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)}


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

    def check_settings(self, name: str, given: Iterable[str], key: str) -> Entry:
        """The entry for `name`, after refusing any setting in `given` it does not have; `key` is where
        the user sets them (e.g. "model.kwargs")."""
        entry = self.get(name)
        known = entry.settings()
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigError(f"{self.kind} {name!r} has no setting {', '.join(unknown)}; its settings are: "
                              f"{', '.join(sorted(known)) or 'none'} (set one as {key}.KEY=VALUE).")
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def discover(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (call it from the package's __init__ with __name__, __path__),
    so that a new option registers itself by existing."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
