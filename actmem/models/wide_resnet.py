"""Wide ResNets (Zagoruyko & Komodakis 2016): the pre-activation basic blocks of preact_resnet.py,
k times wider, with optional dropout between the two convolutions (0 by default)."""
from __future__ import annotations

from actmem.core.errors import ConfigError
from actmem.models.base import MODELS
from actmem.models.preact_resnet import PreActBlock, PreActResNet


@MODELS.register("wrn28_10", input="cifar", activation="relu", family="wide_resnet",
                 blocks=(PreActBlock,))
def wrn28_10(num_classes: int, dropout: float = 0.0, zero_init_residual: bool = False) -> PreActResNet:
    """36.5M parameters: depth 28 = 6n+4 with n=4 blocks per stage, widths 160-320-640."""
    if not 0 <= dropout < 1:
        raise ConfigError(f"wrn28_10: dropout={dropout}; use a probability in [0, 1), "
                          "e.g. 0.3 as in the paper.")
    return PreActResNet(PreActBlock, 4, [160, 320, 640], num_classes, zero_init_residual, dropout=dropout)
