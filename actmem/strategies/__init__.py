"""Strategies: one module each, registered in STRATEGIES; `apply(model, name_or_cfg, **kw)`."""
from actmem.strategies import checkpoint, exact  # noqa: F401  (registration)
from actmem.strategies.base import STRATEGIES, apply, resolve

__all__ = ["STRATEGIES", "apply", "resolve"]
