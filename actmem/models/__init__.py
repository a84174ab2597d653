"""Models: one module per family; importing it registers its builders in MODELS (the `model=` group).

`build(name, num_classes, **kwargs)` gives a freshly initialised model (deterministic under
`torch.manual_seed`). CIFAR models take 32x32 input, ImageNet ones (torchvision's) any size >= 32.
"""
from __future__ import annotations

import torch.nn as nn

from actmem.core.errors import ConfigError
from actmem.core.registry import discover
from actmem.models.base import MODELS

discover(__name__, __path__)

__all__ = ["MODELS", "block_types", "build", "info", "init_from_data", "names"]

# What info() says of a model unless its registration says otherwise (true of all of ours).
_INFO_DEFAULTS = dict(
    source="actmem",
    reuses_activation=False,  # one activation module instance called at several sites
    inplace_activation=False,  # activations with inplace=True
    functional_activation=False,  # some activation called as a function (not swappable)
    data_init=None,  # fn(model, first_images): sets layers from training data before training
)


def build(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A fresh model by registered name; kwargs go to its builder (see `info(name)["kwargs"]`)."""
    entry = MODELS.check_settings(name, kwargs, "model.kwargs")
    if num_classes < 1:
        raise ConfigError(f"model {name!r}: num_classes={num_classes}; it must be at least 1.")
    return entry.fn(num_classes, **kwargs)


def init_from_data(name: str, model: nn.Module, first_images, dataset: str) -> None:
    """Run the model's data-dependent init, if it registered one (`data_init=`), before any strategy is
    applied; `first_images(n)` gives the first n normalised training images (None: the dataset's loader
    does not hold them in memory)."""
    init = MODELS.get(name).meta.get("data_init")
    if init is None:
        return
    if first_images is None:
        raise ConfigError(f"model={name} initialises a layer from training images, which dataset={dataset}'s "
                          "loader does not hold in memory; use a CIFAR-type dataset with it.")
    init(model, first_images)


def names() -> list[str]:
    return MODELS.names()


def info(name: str) -> dict:
    """{"input": "cifar"|"imagenet", "activation", "family", "source", the three activation flags
    of _INFO_DEFAULTS, "blocks": the block classes it declared, "kwargs": {option: default}}."""
    entry = MODELS.get(name)
    return {**_INFO_DEFAULTS, **entry.meta, "kwargs": entry.settings()}


def block_types() -> tuple[type[nn.Module], ...]:
    """The classes that are one residual / dense / transformer block, as each model declared them when
    it registered (`blocks=`): the unit of activation checkpointing at "block" granularity."""
    return tuple(dict.fromkeys(t for entry in MODELS.entries() for t in entry.meta["blocks"]))
