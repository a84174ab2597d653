"""The training step that the training and profile sections time: a model under a strategy, one
synthetic batch made on the device, forward + cross-entropy + backward + SGD step, optionally under
autocast; and which models, batches and dtypes a run uses (on the GPU, or toy ones for a dry run)."""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck

from actmem import models, strategies
from actmem.strategies.base import replace_modules
from actmem.strategies.checkpoint import Checkpointed
from actmem.strategies.forward_ad import Deferred, find_pairs

RECOMPUTE = "recompute σ->f2"
VARIANTS = {  # table label: (strategy, settings)
    "exact": ("exact", {}),
    "checkpoint": ("checkpoint", {}),
    "actnn L3": ("actnn", {"level": "L3"}),
    "division": ("division", {}),
    "blpa 4": ("blpa", {"bits": 4}),
    "fewbit 3": ("fewbit", {"bits": 3}),
    "forward_ad": ("forward_ad", {}),
    "combo": ("combo", {}),
}
CONV_LABELS = ("exact", "checkpoint", "actnn L3", "division", "blpa 4")
VIT_LABELS = ("exact", "checkpoint", RECOMPUTE, "fewbit 3", "forward_ad", "combo")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtype


@dataclass(frozen=True)
class Workload:
    name: str
    make: Callable[[], nn.Module]
    image: int  # input side
    classes: int


@dataclass(frozen=True)
class Plan:
    conv: Workload
    conv_batches: tuple[int, ...]  # the first is the one the throughput targets refer to
    vit: Workload
    vit_batch: int
    dtypes: tuple[str, ...]  # keys of DTYPES
    warmup: int  # untimed steps per strategy: the first compiles and autotunes, the others give the peaks
    min_rounds: int  # timed round-robin rounds, at least ...
    max_rounds: int  # ... and at most


def resnet50() -> nn.Module:
    return models.build("resnet50", num_classes=1000)


def vit_tiny() -> nn.Module:
    return models.build("vit_tiny", num_classes=10)


def toy_resnet() -> nn.Module:
    """Two of resnet50's torchvision Bottleneck blocks at 4 channels: the same block type, so every
    strategy takes resnet50's code path, at a size the Triton interpreter runs in seconds."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         Bottleneck(4, 1), Bottleneck(4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def toy_vit() -> nn.Module:
    return models.build("vit_tiny", num_classes=10, depth=1, dim=32, heads=2)


GPU = Plan(Workload("resnet50", resnet50, 224, 1000), (64, 128), Workload("vit_tiny", vit_tiny, 32, 10), 256,
           ("fp32", "bf16"), warmup=2, min_rounds=3, max_rounds=10)
# The dry run checks the code paths, not the numbers: one sample, autocast only (fp32 is the same code).
DRY = Plan(Workload("toy Bottleneck net", toy_resnet, 16, 10), (1,), Workload("vit_tiny depth 1 dim 32", toy_vit,
           32, 10), 1, ("bf16",), warmup=1, min_rounds=1, max_rounds=1)


def plan(dry_run: bool) -> Plan:
    return DRY if dry_run else GPU


@functools.cache
def initial(w: Workload) -> nn.Module:
    """w's model as initialised under seed 0, on the CPU: made once (resnet50 takes a second)."""
    torch.manual_seed(0)
    return w.make()


def build(w: Workload, label: str, device: torch.device) -> nn.Module:
    """w's model (the same initial weights for every label) on device, under the strategy of `label`
    (applied after the move, as actmem.train does). Raises StrategyError where the strategy cannot
    serve the model."""
    model = copy.deepcopy(initial(w)).to(device)
    if label == RECOMPUTE:
        return recompute_pairs(model)
    name, settings = VARIANTS[label]
    return strategies.apply(model, name, **settings)


def recompute_pairs(model: nn.Module) -> nn.Module:
    """Checkpoint each σ -> f2 pair that forward_ad would fuse (keeps σ's input, reruns σ and f2 in
    backward): recomputation at forward_ad's granularity and memory, the forward-AD paper's baseline."""
    modules = dict(model.named_modules())
    new = {}
    for act, layer in find_pairs(model):
        new[modules[layer]] = Checkpointed.swap(nn.Sequential(modules[act], modules[layer]))
        new[modules[act]] = Deferred()
    replace_modules(model, lambda name, m: m in new, new.get)
    return model


def batch(w: Workload, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch made on the device (no loader, no host-to-device copy in the timings)."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(size, 3, w.image, w.image, generator=g, device=device)
    return x, torch.randint(0, w.classes, (size,), generator=g, device=device)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
