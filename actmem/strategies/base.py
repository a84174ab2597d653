"""The strategy registry and the helpers every strategy shares.

A strategy is `fn(model, cfg) -> model`: it rewrites the model (swapping submodules) so that the
forward output is unchanged bit for bit and only what autograd keeps for backward differs. It must
refuse a model it cannot serve by raising StrategyError, at apply time, before training starts.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from actmem.errors import ConfigError, StrategyError
from actmem.registry import Registry

STRATEGIES = Registry("strategy")


def resolve(name_or_cfg, **overrides) -> DictConfig:
    """A strategy name or config (dict / DictConfig / dataclass) -> the full config, typed by its schema."""
    if isinstance(name_or_cfg, str):
        given = {"name": name_or_cfg}
    elif isinstance(name_or_cfg, DictConfig) or hasattr(name_or_cfg, "__dataclass_fields__"):
        given = OmegaConf.to_container(OmegaConf.structured(name_or_cfg), resolve=True)
    else:
        given = dict(name_or_cfg)
    if "name" not in given:
        raise ConfigError(f"A strategy config needs a 'name'; valid names: {', '.join(STRATEGIES.names())}.")
    entry = STRATEGIES.get(given["name"])
    try:
        return OmegaConf.merge(OmegaConf.structured(entry.schema), given, overrides)
    except OmegaConfBaseException as e:
        keys = ", ".join(entry.schema.__dataclass_fields__)
        raise ConfigError(f"Bad setting for strategy {given['name']!r}: {e.msg}. Its keys are: {keys}.") from None


def apply(model: nn.Module, name_or_cfg, **overrides) -> nn.Module:
    """Apply a strategy by name (`apply(m, "actnn", bits=2)`) or by config (`apply(m, cfg)`)."""
    cfg = resolve(name_or_cfg, **overrides)
    done = getattr(model, "actmem_strategy", None)
    if done is not None:
        raise StrategyError(f"this model is already converted by strategy {done!r}; apply {cfg.name!r} to a fresh "
                            "model (models.build), or apply both at once: strategy=combo with "
                            f"strategy.parts=[{done},{cfg.name}].")
    model = STRATEGIES.get(cfg.name).fn(model, cfg)
    if cfg.name != "exact":  # exact changes nothing: any strategy may follow it
        model.actmem_strategy = cfg.name
    return model


class Claimed:
    """Mixin for every module a strategy puts in place. Later strategies (combo's later parts) leave a
    claimed module, and everything inside it, alone."""

    @classmethod
    def swap(cls, module: nn.Module, **attrs):
        """The same module (parameters, buffers, hooks, state_dict keys) as an instance of cls, plus attrs."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__, **attrs)
        return new


def replace_modules(model: nn.Module, select: Callable[[str, nn.Module], bool],
                    make: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Swap every module chosen by `select(name, module)` for `make(module)`, outermost first (a chosen
    module's children are not visited; claimed modules are skipped whole). Returns the names replaced."""
    replaced = []

    def visit(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            if isinstance(child, Claimed):
                continue
            if select(name, child):
                setattr(parent, child_name, make(child))
                replaced.append(name)
            else:
                visit(child, name + ".")

    visit(model, "")
    return replaced
