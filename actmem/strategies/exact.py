"""Exact training: the baseline every ratio is measured against."""
from dataclasses import dataclass

from actmem.strategies.base import STRATEGIES


@dataclass
class ExactConfig:
    name: str = "exact"


@STRATEGIES.register("exact", schema=ExactConfig)
def apply_exact(model, cfg):
    return model
