"""The strategy kit, part 1: the registry, and finding and replacing the modules a strategy serves.

A strategy registers `fn(model, cfg) -> model` with its config schema and a `check(cfg)`:
`@STRATEGIES.register("name", schema=NameConfig, check=check_name)`. `check` refuses impossible
settings with ConfigError naming `strategy.KEY`; `resolve` runs it, so a bad setting fails before any
data is loaded or model built. `fn` rewrites the model so that the forward output is unchanged bit for
bit and only what autograd keeps for backward differs, and raises StrategyError for a model it cannot
serve. The tools: `trace` (a torch.fx graph with one leaf rule), `Claimed.swap` and `replace_modules`
(one way to put a module in place); part 2, the backward ops from a decoded input and the saving of
packed state, is `actmem.strategies.ops`. docs/adding-a-strategy.md walks through one.
"""
from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import torch.fx as fx
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from actmem.core.errors import ConfigError, StrategyError
from actmem.core.registry import Registry

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
        cfg = OmegaConf.merge(OmegaConf.structured(entry.schema), given, overrides)
    except OmegaConfBaseException as e:
        keys = ", ".join(entry.schema.__dataclass_fields__)
        raise ConfigError(f"Bad setting for strategy {given['name']!r}: {e.msg}. Its keys are: {keys}.") from None
    entry.meta.get("check", lambda cfg: None)(cfg)
    return cfg


def _combo_hint(first: str, second: str) -> str:
    """How to have both strategies on one model, where combo takes them in some order; else why not."""
    for parts in ([first, second], [second, first]):
        try:
            resolve({"name": "combo", "parts": parts})
            return f", or apply both at once: strategy=combo with strategy.parts=[{','.join(parts)}]."
        except ConfigError as e:
            reason = str(e)
    return f"; the two cannot be combined ({reason})"


def apply(model: nn.Module, name_or_cfg, **overrides) -> nn.Module:
    """Apply a strategy by name (`apply(m, "actnn", bits=2)`) or by config (`apply(m, cfg)`)."""
    cfg = resolve(name_or_cfg, **overrides)
    done = getattr(model, "actmem_strategy", None)
    if done is not None:
        raise StrategyError(f"this model is already converted by strategy {done!r}; apply {cfg.name!r} to a fresh "
                            f"model (models.build){_combo_hint(done, cfg.name)}")
    model = STRATEGIES.get(cfg.name).fn(model, cfg)
    if cfg.name != "exact":  # exact changes nothing: any strategy may follow it
        model.actmem_strategy = cfg.name
    return model


def codec_states(model: nn.Module) -> list[dict]:
    """Every swapped layer's codec state, in module order: what a checkpoint keeps besides the
    state_dict so that a resumed run compresses as an uninterrupted one would (ActNN L3's statistics)."""
    return [m.codec.state_dict() for m in model.modules() if getattr(m, "codec", None) is not None]


def load_codec_states(model: nn.Module, states: list[dict]) -> None:
    codecs = [m.codec for m in model.modules() if getattr(m, "codec", None) is not None]
    if len(codecs) != len(states):
        raise StrategyError(f"the checkpoint holds {len(states)} codec states for {len(codecs)} compressed layers: "
                            "it was written for another strategy or model.")
    for codec, state in zip(codecs, states):
        codec.load_state_dict(state)


class Claimed:
    """Mixin for every module a strategy puts in place. Later strategies (combo's later parts) leave a
    claimed module, and everything inside it, alone."""

    @classmethod
    def swap(cls, module: nn.Module, **attrs):
        """The same module (parameters, buffers, children, hooks, state_dict keys) as an instance of cls,
        plus attrs. A cls that is a mixin, not a subclass of the module's class, is combined with it
        (`Checkpointed.swap(block)` is the block, recomputed)."""
        kind = cls if issubclass(cls, type(module)) else _combined(cls, type(module))
        new = kind.__new__(kind)
        new.__dict__.update(module.__dict__, **attrs)
        for table in ("_parameters", "_buffers", "_modules"):  # its own tables: adding to one leaves the original
            setattr(new, table, dict(getattr(module, table)))
        return new


@functools.cache
def _combined(mixin: type, base: type) -> type:
    return type(f"{mixin.__name__}{base.__name__}", (mixin, base), {"__module__": mixin.__module__})


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


class Graph:
    """A model's torch.fx graph with the one leaf rule every strategy shares: a claimed module (another
    strategy's) is opaque, as is any module `leaf(module)` names."""

    def __init__(self, model: nn.Module, strategy: str, leaf: Callable[[nn.Module], bool] = lambda m: False):
        class Tracer(fx.Tracer):
            def is_leaf_module(self, m, qualname):
                return isinstance(m, Claimed) or leaf(m) or super().is_leaf_module(m, qualname)

        try:
            self.nodes = list(Tracer().trace(model).nodes)
        except Exception as e:  # fx raises many types; the message is what matters
            raise StrategyError(
                f"{strategy} finds the layers it serves by tracing the model with torch.fx, which failed for "
                f"{type(model).__name__} ({type(e).__name__}: {e}). Make the forward traceable (no data-dependent "
                "control flow), or use strategy=actnn, division or checkpoint.") from None
        self.modules = dict(model.named_modules())
        self.call_count = Counter(n.target for n in self.nodes if n.op == "call_module")

    def module(self, node: fx.Node) -> nn.Module | None:
        """The module a node calls (None for other nodes)."""
        return self.modules[node.target] if node.op == "call_module" else None

    def calls(self, node: fx.Node, kinds) -> bool:
        """The node calls a module whose class is exactly one of `kinds` (a subclass may differ)."""
        return node.op == "call_module" and type(self.modules[node.target]) in kinds
