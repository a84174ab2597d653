"""Datasets: `build(cfg, ...)` -> DataBundle of train/test loaders whose batches are already on the device.

One module per family registers its builder and config schema in DATASETS (the `dataset=` group); each
builder takes the data-parallel `rank` and `world_size` and serves that rank's shard.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from actmem.core.errors import ConfigError
from actmem.core.registry import discover
from actmem.data.loader import DATASETS, DataBundle, DeviceLoader, TensorLoader

discover(__name__, __path__)

__all__ = ["DATASETS", "DataBundle", "DeviceLoader", "TensorLoader", "build"]


def _fields(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"dataset config must be a DictConfig, dict or dataclass, not {type(cfg).__name__}")


def build(cfg, *, batch_size: int, device: torch.device | str, seed: int, rank: int = 0,
          world_size: int = 1) -> DataBundle:
    """The dataset `cfg.name` with the rest of cfg as its schema's fields (defaults for those left out),
    as rank `rank` of `world_size` data-parallel processes sees it; `batch_size` is per rank."""
    fields = _fields(cfg)
    entry = DATASETS.check_settings(fields.get("name"), fields, "dataset")
    if batch_size < 1:
        raise ConfigError(f"trainer.batch_size={batch_size}: it must be a positive integer, e.g. 128.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} of world_size={world_size}: a rank is in [0, world_size)")
    return entry.fn(entry.schema(**fields), batch_size=batch_size, device=torch.device(device), seed=seed,
                    rank=rank, world_size=world_size)
