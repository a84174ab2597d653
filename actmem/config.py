"""Structured configs: each Hydra group option is typed by a dataclass, so a wrong key or type fails
at composition with Hydra's own message. Registries supply the per-option schemas."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from actmem.errors import ConfigError
from actmem.loggers import LOGGERS
from actmem.optim import OPTIMIZERS, SCHEDULES

DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class TrainerConfig:
    epochs: float = 1  # a fraction ends the last epoch early: ceil(epochs * steps per epoch) steps in all
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    batch_size: int = 128
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    deterministic: bool = False
    warmup_steps: int = 5  # steps left out of the throughput figure
    measure_activations: bool = True
    progress: bool = True  # a bar per epoch, only when stderr is a terminal
    threads: int | None = None  # torch CPU threads; default: torch's choice
    tta: int = 0  # test-time augmentation of the final evaluation: 0 none, 1 mirror, 2 mirror + 1-px shifts
    checkpoint_every: int | None = None  # also checkpoint every this many steps (besides each epoch's end)
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA)


@dataclass
class ParamGroupConfig:
    """Parameters (shell-style name patterns) with their own lr / weight-decay multipliers, or trained
    only for their first `train_epochs` epochs (actmem.optim.param_groups, set_trainable)."""

    params: list[str] = MISSING
    lr_scale: float = 1.0
    weight_decay_scale: float = 1.0
    train_epochs: float | None = None


@dataclass
class LookaheadConfig:
    """airbench94's lookahead: an average of the weights that every `every_n_steps` steps from epoch
    `start_epochs` on is moved towards them and copied back into the model (actmem.lookahead)."""

    start_epochs: float = 3
    every_n_steps: int = 5
    decay_base: float = 0.95
    decay_pow: float = 3.0


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1  # lr factor at step 0 of the warm-up
    milestones: list[float] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1
    cycle_start: float = 0.0  # onecycle: lr factor at step 0, ...
    cycle_peak: float = 0.3  # ... fraction of the steps where it reaches 1, ...
    cycle_end: float = 0.0  # ... and factor at the last step
    label_smoothing: float = 0.0
    groups: list[ParamGroupConfig] = field(default_factory=list)
    lookahead: LookaheadConfig | None = None


@dataclass
class ModelConfig:
    name: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the model's builder


@dataclass
class LoggerConfig:
    name: str = "jsonl"
    log_every: int = 50  # jsonl/wandb: a train record every this many steps, besides each epoch's
    project: str = "actmem"
    mode: str = "offline"  # wandb mode; set "online" yourself if you want it synced


@dataclass
class Config:
    seed: int = 0
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


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg) -> None:
    """Impossible settings fail here, before any data is loaded or model built."""
    t, o = cfg.trainer, cfg.optim
    _check(t.batch_size > 0, f"trainer.batch_size={t.batch_size}: it must be a positive integer, e.g. 128.")
    _check(t.epochs > 0, f"trainer.epochs={t.epochs}: it must be positive (a fraction ends the last epoch early).")
    _check(t.checkpoint_every is None or t.checkpoint_every > 0,
           f"trainer.checkpoint_every={t.checkpoint_every}: give a number of steps >= 1, or null for epoch ends only.")
    _check(t.tta in (0, 1, 2), f"trainer.tta={t.tta}: use 0 (no test-time augmentation), 1 (mirror) or 2 (mirror "
                               "and 1-pixel shifts).")
    _check(t.max_steps is None or t.max_steps > 0,
           f"trainer.max_steps={t.max_steps}: use a positive number of steps, or null for no limit.")
    _check(t.warmup_steps >= 0, f"trainer.warmup_steps={t.warmup_steps}: it must be >= 0.")
    _check(t.device in DEVICES, f"trainer.device={t.device!r}: use one of {', '.join(DEVICES)}.")
    _check(t.amp in AMP_MODES, f"trainer.amp={t.amp!r}: use one of {', '.join(AMP_MODES)}.")
    _check(o.name in OPTIMIZERS, f"optim.name={o.name!r}: use one of {', '.join(OPTIMIZERS.names())} "
                                 "(optim=NAME).")
    _check(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}: use one of {', '.join(SCHEDULES.names())}.")
    _check(0 < o.lr < math.inf, f"optim.lr={o.lr}: the learning rate must be a positive finite number, e.g. 0.1.")
    _check(o.warmup_epochs >= 0, f"optim.warmup_epochs={o.warmup_epochs}: it must be >= 0.")
    _check(o.momentum >= 0, f"optim.momentum={o.momentum}: it must be >= 0 (SGD's default here is 0.9).")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: it must be >= 0.")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optim.betas={list(o.betas)}: AdamW takes two values in [0, 1), e.g. optim.betas=[0.9,0.999].")
    _check(cfg.seed >= 0, f"seed={cfg.seed}: torch takes seeds from 0 to 2**64 - 1; use a non-negative seed.")
    _check(t.threads is None or t.threads > 0,
           f"trainer.threads={t.threads}: give a positive number of CPU threads, or null for torch's choice.")
    _check(0 <= o.label_smoothing < 1, f"optim.label_smoothing={o.label_smoothing}: use a value in [0, 1).")
    _check(o.schedule != "multistep" or len(o.milestones) > 0,
           "optim.schedule=multistep needs optim.milestones, e.g. optim.milestones=[100,150].")
    _check(0 <= o.cycle_peak <= 1, f"optim.cycle_peak={o.cycle_peak}: the peak's place is a fraction of the "
                                    "steps, in [0, 1].")
    for i, g in enumerate(o.groups):
        _check(g.lr_scale > 0 and g.weight_decay_scale >= 0, f"optim.groups[{i}]: lr_scale={g.lr_scale} must be "
               f"> 0 and weight_decay_scale={g.weight_decay_scale} >= 0.")
        _check(g.train_epochs is None or g.train_epochs >= 0,
               f"optim.groups[{i}].train_epochs={g.train_epochs}: give a number of epochs >= 0, or null.")
    la = o.lookahead
    _check(la is None or (la.every_n_steps >= 1 and 0 <= la.decay_base <= 1 and la.start_epochs >= 0),
           f"optim.lookahead={la}: every_n_steps must be >= 1, decay_base in [0, 1], start_epochs >= 0; or "
           "optim.lookahead=null for none.")
    _check(cfg.logger.name in LOGGERS, f"logger.name={cfg.logger.name!r}: use one of {', '.join(LOGGERS.names())}.")
