"""Strategies: one module each, registered in STRATEGIES; `apply(model, name_or_cfg, **kw)`.

Every module of this package is imported here, so a new strategy registers itself by existing."""
from actmem.core.registry import discover
from actmem.strategies.base import STRATEGIES, apply, codec_states, load_codec_states, resolve

discover(__name__, __path__)

__all__ = ["STRATEGIES", "apply", "codec_states", "load_codec_states", "resolve"]
