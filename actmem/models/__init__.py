"""Models: one module per family; importing it registers its builders in MODELS (the `model=` group).

`build(name, num_classes, **kwargs)` gives a freshly initialised model (deterministic under
`torch.manual_seed`). CIFAR models take 32x32 input, ImageNet ones (torchvision's) any size >= 32.
"""
from __future__ import annotations

import inspect

import torch.nn as nn
from torchvision.models import convnext, densenet, efficientnet, resnet

from actmem.errors import ConfigError
from actmem.models import densenet_cifar, imagenet, preact_resnet, resnet_cifar, vit, wide_resnet  # noqa: F401
from actmem.models.base import MODELS

__all__ = ["MODELS", "block_types", "build", "info", "names"]

# What info() says of a model unless its registration says otherwise (true of all of ours).
_INFO_DEFAULTS = dict(
    source="actmem",
    reuses_activation=False,  # one activation module instance called at several sites
    inplace_activation=False,  # activations with inplace=True
    functional_activation=False,  # some activation called as a function (not swappable)
)


def build(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A fresh model by registered name; kwargs go to its builder (see `info(name)["kwargs"]`)."""
    entry = MODELS.get(name)
    options = _options(entry.fn)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(f"model {name!r} has no option {', '.join(unknown)}; its options are: "
                          f"{', '.join(options) or 'none'} (set one as model.kwargs.KEY=VALUE).")
    if num_classes < 1:
        raise ConfigError(f"model {name!r}: num_classes={num_classes}; it must be at least 1.")
    return entry.fn(num_classes, **kwargs)


def names() -> list[str]:
    return MODELS.names()


def info(name: str) -> dict:
    """{"input": "cifar"|"imagenet", "activation", "family", "source", the three activation flags
    of _INFO_DEFAULTS, "kwargs": {option: default}}."""
    entry = MODELS.get(name)
    return {**_INFO_DEFAULTS, **entry.meta, "kwargs": _options(entry.fn)}


def block_types() -> tuple[type[nn.Module], ...]:
    """The classes that are one residual / dense / transformer block, ours and torchvision's: the unit
    of activation checkpointing at "block" granularity."""
    return (
        resnet_cifar.BasicBlock, preact_resnet.PreActBlock, preact_resnet.PreActBottleneck,
        densenet_cifar.DenseLayer, vit.TransformerBlock,
        resnet.BasicBlock, resnet.Bottleneck, densenet._DenseLayer, efficientnet.MBConv,
        efficientnet.FusedMBConv, convnext.CNBlock,
    )


def _options(fn) -> dict:
    params = list(inspect.signature(fn).parameters.values())[1:]  # after num_classes
    return {p.name: p.default for p in params}
