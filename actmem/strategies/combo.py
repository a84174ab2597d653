"""combo: several strategies on one model, applied in order (`strategy.parts=[fewbit,actnn]`).

Each part swaps the modules it serves; every swapped module is `Claimed`, so a later part leaves an
earlier part's layers alone (e.g. fewbit takes the GELUs, then actnn compresses the Linear inputs).
Combinations that cannot work are refused before anything is applied:
- checkpoint with anything: inside a recomputed block nothing is kept, so there is nothing left to
  compress, and the recomputation would re-run the other parts' packing;
- actnn, division and blpa with each other: they compress the saved inputs of the same Conv/Linear/
  BatchNorm layers, so whichever came second would find nothing to do;
- forward_ad after fewbit, actnn, division or blpa: those claim the activation (fewbit) or the
  Linear/Conv after it (the others) that forward_ad fuses. Put forward_ad first: it fuses the
  σ -> Linear/Conv pairs, and fewbit then serves the activations it could not fuse (those that feed
  anything other than one Linear/Conv), actnn the remaining layers. fewbit and forward_ad thus
  never act on the same activation.
- a part named twice, or combo inside combo.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from actmem.core.errors import ConfigError, StrategyError
from actmem.strategies.base import STRATEGIES, resolve

SAME_LAYERS = ("actnn", "division", "blpa")


@dataclass
class ComboConfig:
    name: str = "combo"
    parts: list[Any] = field(default_factory=lambda: ["fewbit", "actnn"])  # names or strategy configs


def check_combo(cfg) -> None:
    """Each part's own settings (resolving a part checks them), then the combination: StrategyError for
    one that cannot work (see the module docstring)."""
    names = [resolve(p).name for p in cfg.parts]
    if not names:
        raise ConfigError("strategy=combo needs strategy.parts, e.g. strategy.parts=[fewbit,actnn].")
    if "combo" in names:
        raise StrategyError("combo parts cannot be combo themselves; list the strategies directly.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise StrategyError(f"combo lists {', '.join(twice)} twice; each strategy can be a part once.")
    if "checkpoint" in names and len(names) > 1:
        raise StrategyError("checkpoint cannot be combined: inside a recomputed block nothing is kept, so "
                            "the other parts would have nothing to compress. Use strategy=checkpoint alone.")
    same = [n for n in names if n in SAME_LAYERS]
    if len(same) > 1:
        raise StrategyError(f"{' and '.join(same)} compress the inputs of the same Conv/Linear/BatchNorm "
                            "layers, so only the first would act; pick one of them.")
    if "forward_ad" in names:
        before = [n for n in names[: names.index("forward_ad")] if n in ("fewbit", *SAME_LAYERS)]
        if before:
            raise StrategyError(f"forward_ad after {', '.join(before)}: those claim the activations or the "
                                "Linear/Conv layers forward_ad fuses. Put forward_ad first, e.g. "
                                f"strategy.parts=[forward_ad,{','.join(n for n in names if n != 'forward_ad')}].")


@STRATEGIES.register("combo", schema=ComboConfig, check=check_combo)
def apply_combo(model: nn.Module, cfg) -> nn.Module:
    parts = [resolve(p) for p in cfg.parts]
    for i, part in enumerate(parts):
        try:
            model = STRATEGIES.get(part.name).fn(model, part)
        except StrategyError as e:
            raise StrategyError(f"combo part {i + 1} ({part.name}): {e}") from None
    return model
