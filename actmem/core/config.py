"""Structured configs: each Hydra group option is typed by a dataclass, so a wrong key or type fails
at composition with Hydra's own message. Registries supply the per-option schemas.

A value's rule lives beside its default: `knob(default, rule, ok)` puts the rule in the field's metadata,
and `validate` walks every group of the composed config against its schema, so every key of every group
gets the same up-front check and the same message ("KEY=VALUE: RULE."). A NaN or infinite number is
refused everywhere: no setting means anything with one, and JSON cannot record it."""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from actmem.compress.backend import BACKENDS
from actmem.core.errors import ConfigError
from actmem.runtime.loggers import LOGGERS, WANDB_MODES
from actmem.runtime.optim import OPTIMIZERS, SCHEDULES

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")  # the Hydra config tree
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("none", "bf16", "fp16")


def knob(default: Any, rule: str, ok: Callable[[Any], bool]):
    """A schema field whose values must satisfy `ok` (None, where the default is None, always does);
    `rule` says in words what is allowed, for the error message. A callable default (list, a lambda)
    makes each config's own value, as dataclasses' default_factory."""
    meta = {"rule": rule, "ok": ok}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def positive(v) -> bool:
    return v > 0


def non_negative(v) -> bool:
    return v >= 0


def one_of(*names: str) -> Callable[[Any], bool]:
    return lambda v: v in names


def in_unit_interval(v) -> bool:
    return 0 <= v <= 1


@dataclass
class TrainerConfig:
    # a fraction ends the last epoch early: ceil(epochs * steps per epoch) steps in all
    epochs: float = knob(1, "it must be a positive finite number (a fraction ends the last epoch early)", positive)
    max_steps: int | None = knob(None, "use a positive number of steps, or null for no limit", positive)
    batch_size: int = knob(128, "it must be a positive integer, e.g. 128", positive)
    device: str = knob("auto", f"use one of {', '.join(DEVICES)}", one_of(*DEVICES))
    amp: str = knob("none", f"use one of {', '.join(AMP_MODES)}", one_of(*AMP_MODES))
    channels_last: bool = False
    deterministic: bool = False
    warmup_steps: int = knob(5, "it must be >= 0 (steps left out of the throughput figure)", non_negative)
    measure_activations: bool = True
    progress: bool = True  # a bar per epoch, only when stderr is a terminal
    threads: int | None = knob(None, "give a positive number of CPU threads, or null for torch's choice", positive)
    # test-time augmentation of the final evaluation: 0 none, 1 mirror, 2 mirror + 1-px shifts
    tta: int = knob(0, "use 0 (no test-time augmentation), 1 (mirror) or 2 (mirror and 1-pixel shifts)",
                    lambda v: v in (0, 1, 2))
    checkpoint_every: int | None = knob(None, "give a number of steps >= 1, or null for epoch ends only", positive)
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA)


@dataclass
class ParamGroupConfig:
    """Parameters (shell-style name patterns) with their own lr / weight-decay multipliers, or trained
    only for their first `train_epochs` epochs (actmem.runtime.optim.param_groups, set_trainable)."""

    params: list[str] = MISSING
    lr_scale: float = knob(1.0, "it must be > 0 (a multiplier of optim.lr)", positive)
    weight_decay_scale: float = knob(1.0, "it must be >= 0 (a multiplier of optim.weight_decay)", non_negative)
    train_epochs: float | None = knob(None, "give a number of epochs >= 0, or null", non_negative)


@dataclass
class LookaheadConfig:
    """airbench94's lookahead: an average of the weights that every `every_n_steps` steps from epoch
    `start_epochs` on is moved towards them and copied back into the model (actmem.runtime.lookahead). Always
    present, off unless `enabled`, so that each key can be set from the command line."""

    enabled: bool = False
    start_epochs: float = knob(3, "it must be >= 0", non_negative)
    every_n_steps: int = knob(5, "it must be >= 1", positive)
    decay_base: float = knob(0.95, "it must be in [0, 1]", in_unit_interval)
    decay_pow: float = knob(3.0, "it must be >= 0", non_negative)


@dataclass
class OptimConfig:
    name: str = knob("sgd", f"use one of {', '.join(OPTIMIZERS.names())} (optim=NAME)",
                     lambda v: v in OPTIMIZERS)
    lr: float = knob(0.1, "the learning rate must be a positive finite number, e.g. 0.1", positive)
    momentum: float = knob(0.9, "it must be in [0, 1) (SGD's default here is 0.9)", lambda v: 0 <= v < 1)
    nesterov: bool = False
    weight_decay: float = knob(5e-4, "it must be >= 0", non_negative)
    betas: list[float] = knob(lambda: [0.9, 0.999], "AdamW takes two values in [0, 1), e.g. optim.betas=[0.9,0.999]",
                              lambda v: len(v) == 2 and all(0 <= b < 1 for b in v))
    schedule: str = knob("cosine", f"use one of {', '.join(SCHEDULES.names())}", lambda v: v in SCHEDULES)
    warmup_epochs: float = knob(0.0, "it must be >= 0", non_negative)
    warmup_start: float = knob(0.1, "the lr factor at step 0 of the warm-up must be in [0, 1]", in_unit_interval)
    milestones: list[float] = knob(list, "epochs >= 0 in increasing order, e.g. optim.milestones=[100,150]",
                                   lambda v: all(m >= 0 for m in v) and all(a < b for a, b in zip(v, v[1:])))
    gamma: float = knob(0.1, "the lr factor at each milestone must be > 0", positive)
    cycle_start: float = knob(0.0, "onecycle's lr factor at step 0 must be >= 0", non_negative)
    cycle_peak: float = knob(0.3, "the peak's place is a fraction of the steps, in [0, 1]", in_unit_interval)
    cycle_end: float = knob(0.0, "onecycle's lr factor at the last step must be >= 0", non_negative)
    label_smoothing: float = knob(0.0, "use a value in [0, 1)", lambda v: 0 <= v < 1)
    groups: list[ParamGroupConfig] = field(default_factory=list)
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)


@dataclass
class ModelConfig:
    name: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the model's builder


@dataclass
class LoggerConfig:
    name: str = knob("jsonl", f"use one of {', '.join(LOGGERS.names())} (logger=NAME)",
                     lambda v: v in LOGGERS)
    # jsonl/wandb: a train record every this many steps, besides each epoch's
    log_every: int = knob(50, "it must be >= 0 (0: epoch records only)", non_negative)
    project: str = "actmem"
    # wandb's mode; set "online" yourself if you want it synced
    mode: str = knob("offline", f"wandb's mode is one of {', '.join(WANDB_MODES)}", one_of(*WANDB_MODES))


@dataclass
class Config:
    seed: int = knob(0, "torch takes seeds from 0 to 2**64 - 1; use a non-negative seed",
                     lambda v: 0 <= v < 2**64)
    debug: bool = False
    dataset: Any = MISSING
    model: ModelConfig = MISSING
    strategy: Any = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING


def register_configs() -> None:
    """Put every schema where the yaml files in configs/ find them (`/schema/<group>/<name>`)."""
    from actmem.data import DATASETS
    from actmem.strategies import STRATEGIES

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schema/model", name="base", node=ModelConfig)
    cs.store(group="schema/optim", name="base", node=OptimConfig)
    cs.store(group="schema/trainer", name="base", node=TrainerConfig)
    cs.store(group="schema/logger", name="base", node=LoggerConfig)
    for registry, group in ((DATASETS, "dataset"), (STRATEGIES, "strategy")):
        for entry in registry.entries():
            cs.store(group=f"schema/{group}", name=entry.name, node=entry.schema)


def check_settings(node, prefix: str = "") -> None:
    """Every value under `node` against its schema's rules (`knob`), and no NaN or infinite number
    anywhere; ConfigError naming the first key that breaks one."""
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    rules = {f.name: f.metadata for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    items = enumerate(node) if isinstance(node, ListConfig) else ((k, node[k]) for k in node)
    for name, value in items:
        key = f"{prefix}[{name}]" if isinstance(node, ListConfig) else f"{prefix}{'.' if prefix else ''}{name}"
        rule = rules.get(name, {})
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: {rule.get('rule', 'give a finite number')} (a NaN or infinite value "
                              "means nothing here).")
        if isinstance(value, (DictConfig, ListConfig)):
            check_settings(value, key)
        if "ok" in rule and value is not None and not rule["ok"](value):
            shown = list(value) if isinstance(value, ListConfig) else value
            raise ConfigError(f"{key}={shown!r}: {rule['rule']}.")


def positive_seconds(value: float, option: str) -> float:
    """`value`, a time limit; a ConfigError naming `option` unless it is a positive, finite number of
    seconds (zero or less would skip every run and still report success, infinity never stop)."""
    if math.isfinite(value) and value > 0:
        return value
    setting = f"{option} " if option.startswith("-") else f"{option}="
    raise ConfigError(f"{setting}{value:g} is not a time limit: give a positive, finite number of seconds, "
                      f"e.g. {setting}600.")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg) -> None:
    """Impossible settings fail here, before any data is loaded or model built: every key by its rule,
    the strategy's own check, then the rules that tie two keys together. (The dataset's keys that need the
    data itself, such as a subset's size, are checked when it is read.)"""
    from actmem.strategies import resolve

    check_settings(cfg)
    resolve(cfg.strategy)
    backend = os.environ.get("ACTMEM_BACKEND", "").strip().lower()
    _check(not backend or backend in BACKENDS, f"the environment variable ACTMEM_BACKEND={backend!r} names no "
           f"codec backend: use one of {', '.join(BACKENDS)}, or unset it (Triton on CUDA, the reference elsewhere).")
    o = cfg.optim
    _check(o.schedule != "multistep" or len(o.milestones) > 0,
           "optim.schedule=multistep needs optim.milestones, e.g. optim.milestones=[100,150].")
    for i, g in enumerate(o.groups):
        _check(len(g.params) > 0, f"optim.groups[{i}].params is empty: give shell-style patterns of parameter "
                                  "names, e.g. ['layers.*.bn*.bias'].")
