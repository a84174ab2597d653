"""Strategies: one module each, registered in STRATEGIES; `apply(model, name_or_cfg, **kw)`.

Every module of this package is imported here, so a new strategy registers itself by existing."""
import importlib
import pkgutil

from actmem.strategies.base import STRATEGIES, apply, resolve

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["STRATEGIES", "apply", "resolve"]
