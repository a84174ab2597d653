"""What a run sets up before it builds anything: the device, the process's threads and seeds, and the
checks that tie the model to its input and to SyncBatchNorm."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from actmem import models
from actmem.core.config import register_configs
from actmem.core.errors import ConfigError
from actmem.runtime.distributed import World, start_time

PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def register_hydra() -> None:
    """What an entry point registers before Hydra composes: every schema (actmem.core.config) and the
    `actmem_now` resolver of the default run directories."""
    register_configs()
    # use_cache: one time per process, so that every directory of a sweep (and a requeued job) agrees
    OmegaConf.register_new_resolver("actmem_now", lambda fmt: start_time().strftime(fmt), replace=True,
                                    use_cache=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu (or auto).")
    return torch.device(name)


def prepare_process(cfg: DictConfig, world: World) -> torch.device:
    """This rank's device, torch's threads and every RNG seeded; sync_bn refused off CUDA."""
    trainer = cfg.trainer
    device = world.device(resolve_device(trainer.device))
    if trainer.sync_bn and world.distributed and device.type != "cuda":
        raise ConfigError("trainer.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only. Use "
                          "trainer.sync_bn=false on the CPU (each rank normalises with its own batch's statistics).")
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    seed_everything(cfg.seed, trainer.deterministic)
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def check_input(model_name: str, image_shape: tuple[int, int, int], dataset_cfg) -> None:
    """Refuse, before training, an input the model was not built for: CIFAR models (and vit_tiny's
    positional embeddings) take 3x32x32; torchvision's ImageNet models any 3-channel size from 64 up
    (below that their stride-32 stem leaves 1x1 maps before the last stage). A fix names only keys this
    dataset has."""
    c, h, w = image_shape
    kind = models.info(model_name)["input"]
    name, keys = dataset_cfg.name, set(dataset_cfg.keys())
    size_key = "image_size" in keys
    if c != 3:
        fix = "set dataset.channels=3" if "channels" in keys else "use a dataset of RGB images"
        raise ConfigError(f"dataset={name} gives {c}-channel images; model={model_name} takes 3 channels ({fix}).")
    if kind == "cifar" and (h, w) != (32, 32):
        raise ConfigError(f"model={model_name} is built for 32x32 CIFAR images; dataset={name} gives {h}x{w}. "
                          + ("Use dataset.image_size=32, or" if size_key else "Use") +
                          " an ImageNet model (resnet50, ...) for this size.")
    if kind == "imagenet" and min(h, w) < 64:
        raise ConfigError(f"model={model_name} is an ImageNet model and dataset={name} gives {h}x{w} images; it "
                          "needs at least 64x64 (224x224 as published). "
                          + ("Use a larger dataset.image_size, or" if size_key else "Use") +
                          " a CIFAR model (resnet20, resnet18, ...) for 32x32.")


def sync_batchnorm(model: nn.Module, strategy: str) -> nn.Module:
    """trainer.sync_bn under torchrun: the model's BatchNorms as SyncBatchNorm (statistics over the global
    batch). A strategy that put its own BatchNorm in their place (actnn, division, blpa: they keep its
    input compressed) normalises per rank, so the two are refused together."""
    own = sorted({type(m).__name__ for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in PLAIN_BATCHNORMS})
    if own:
        raise ConfigError(f"trainer.sync_bn=true cannot go with strategy={strategy}: it replaces BatchNorm with "
                          f"its own layer ({', '.join(own)}), which normalises with each rank's statistics. Use "
                          "trainer.sync_bn=false (per-rank statistics, as DIVISION's torchrun runs train), or a "
                          "strategy that leaves BatchNorm alone (exact, checkpoint, fewbit, forward_ad).")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
