"""Entry point: the largest batch whose training step fits a memory budget (actmem.measure.batch_search):
`python -m actmem.maxbatch memory_budget=16GiB [train's config groups]`, or a `-m` sweep, one row per job.
How it is found (GPU trials, the CPU estimate) is actmem.measure.batch_search. On the CPU the compressed
layers' backward runs its big calls on chunks of the batch (strategies/ops.batch_chunks), whose buffers
stop growing once the batch spans a few chunks: fit at batches past that (`fit_batches=[16,32,64]` for
resnet50 at 224), or the line of small batches overstates the slope and the answer comes out low. The
input is synthetic, of the dataset's shape and class count: no data is read.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import hydra
import torch
import torch.nn as nn
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from actmem import models, strategies
from actmem.core.config import CONFIG_DIR, Config, positive_seconds, validate
from actmem.core.errors import ActmemError, ConfigError, paragraph
from actmem.data.cifar import SPECS as CIFAR
from actmem.measure.batch_search import Job, estimate, human, parse_bytes, too_small, trials
from actmem.runtime.engine import Precision
from actmem.runtime.optim import build_optimizer
from actmem.runtime.rundir import write_json_atomic
from actmem.runtime.setup import check_input, register_hydra, resolve_device

register_hydra()

COLUMNS = ("dataset", "model", "strategy", "budget", "max batch", "found by", "step peak at max batch")


@dataclass
class MaxBatchConfig(Config):
    memory_budget: str = "16GiB"  # bytes, or with a unit: 12GB, 500MiB, 16GiB
    fit_batches: list[int] = field(default_factory=lambda: [2, 4, 8])  # CPU: the batches the line is fitted to
    confirm_below: str = "4GiB"  # CPU: confirm by measured steps where the predicted peak is below this (0: never)
    time_limit: float = 600.0  # seconds: no trial starts that would end later (the CPU answer is then unconfirmed)


ConfigStore.instance().store(name="maxbatch_schema", node=MaxBatchConfig)


# ---------------------------------------------------------------- the command line

def input_spec(cfg) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and class count of the dataset of `cfg`, from the config alone: ImageNet has 1000 classes
    (a subset such as Imagenette fewer; the head is a small part of the step's memory)."""
    if cfg.name == "synthetic":
        shape, classes = (cfg.channels, cfg.image_size, cfg.image_size), cfg.num_classes
    elif cfg.name in CIFAR:
        shape, classes = (3, 32, 32), CIFAR[cfg.name].num_classes
    elif cfg.name == "imagenet":
        shape, classes = (3, cfg.image_size, cfg.image_size), 1000
    else:
        raise ConfigError(f"dataset={cfg.name}: actmem.maxbatch does not know its input shape; use "
                          "dataset=synthetic with dataset.image_size, dataset.channels and dataset.num_classes.")
    if min(*shape, classes) < 1:
        raise ConfigError(f"dataset={cfg.name} gives {shape[0]}x{shape[1]}x{shape[2]} images of {classes} classes; "
                          "each must be a positive integer.")
    return shape, classes


def strategy_label(cfg) -> str:
    """The strategy's name and its width: 'actnn L3', 'blpa bits=4', 'division bits=2', 'exact'."""
    parts = [cfg.name, cfg.get("level")]
    if cfg.get("bits") is not None:
        parts.append(f"bits={cfg.bits:g}")
    return " ".join(p for p in parts if p)


def build_job(cfg: DictConfig, strategy: DictConfig) -> Job:
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    shape, classes = input_spec(cfg.dataset)
    check_input(cfg.model.name, shape, cfg.dataset)
    precision = Precision.build(cfg.trainer.amp, device, cfg.trainer.channels_last)
    torch.manual_seed(cfg.seed)
    initial = models.build(cfg.model.name, num_classes=classes, **cfg.model.kwargs)

    def make_model() -> nn.Module:
        model = copy.deepcopy(initial).to(device)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return strategies.apply(model, strategy)

    return Job(make_model, lambda model: build_optimizer(model, cfg.optim), shape, classes, device,
               f"model={cfg.model.name} under strategy={strategy_label(strategy)}", precision.dtype,
               precision.channels_last)


def run(cfg: DictConfig) -> dict:
    """The row of one run, as a dict (COLUMNS and the details)."""
    validate(cfg)
    budget = parse_bytes(cfg.memory_budget, "memory_budget")
    confirm_below = parse_bytes(cfg.confirm_below, "confirm_below", allow_zero=True)
    batches = sorted(set(cfg.fit_batches))
    if len(batches) < 2 or batches[0] < 1:
        raise ConfigError(f"fit_batches={list(cfg.fit_batches)}: the line needs at least two different positive "
                          "batches, e.g. fit_batches=[2,4,8].")
    time_limit = positive_seconds(cfg.time_limit, "time_limit")
    strategy = strategies.resolve(cfg.strategy)
    job = build_job(cfg, strategy)
    log = partial(print, file=sys.stderr, flush=True)
    if job.device.type == "cuda":
        result = trials(job, budget, deadline=time.monotonic() + time_limit, log=log)
        if not result.exact:
            result.how += (f"; stopped at time_limit={time_limit:g} s: at least {result.batch}"
                           + (f", below {result.failed}" if result.failed else ""))
    else:
        result = estimate(job, budget, batches, confirm_below, time_limit, log)
    if result.batch < 1:
        raise too_small(job, budget, result.peak)
    return {"dataset": cfg.dataset.name, "model": cfg.model.name, "strategy": strategy_label(strategy),
            "budget": human(budget), "max batch": result.batch, "found by": result.how,
            "step peak at max batch": human(result.peak) if result.peak is not None else "-",
            "budget_bytes": budget, "peak_bytes": result.peak, "device": str(job.device),
            "config": OmegaConf.to_container(cfg, resolve=True)}


@hydra.main(config_path=CONFIG_DIR, config_name="maxbatch", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        row = run(cfg)
    except ActmemError as e:
        if cfg.debug:
            raise
        print(paragraph(f"Error: {e}"), file=sys.stderr)
        sys.exit(2)
    hydra_cfg = HydraConfig.get()
    if OmegaConf.select(hydra_cfg, "job.num", default=0) == 0:  # the first job of a sweep, or a single run
        print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |", flush=True)
    write_json_atomic(Path(hydra_cfg.runtime.output_dir) / "maxbatch.json", row)


if __name__ == "__main__":
    main()
