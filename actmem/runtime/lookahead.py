"""Lookahead over the weights, as airbench94 does it (`optim.lookahead`; K. Jordan, arXiv 2404.00498).

From epoch `start_epochs` on, every `every_n_steps` optimizer steps: the first time, a copy of the
model's floating-point state (parameters and BatchNorm running statistics: every float entry of its
state_dict) is taken; each time after, the copy moves towards the model by 1 - rho,
rho = decay_base ** every_n_steps * (step / total_steps) ** decay_pow, and the model is set to the copy.
At each epoch end the model is set to the copy once more, so what is evaluated and checkpointed is the
average. rho grows over training: early the model moves fast, late the average is strong.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Lookahead:
    def __init__(self, cfg, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        self.average: list[torch.Tensor] | None = None

    @staticmethod
    def _state(model: nn.Module) -> list[torch.Tensor]:
        return [t for t in model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, epoch: int) -> None:
        """Call after optimizer step number `step` (1-based) of epoch `epoch` (0-based)."""
        if epoch < self.cfg.start_epochs or step % self.cfg.every_n_steps:
            return
        state = self._state(model)
        if self.average is None:
            self.average = [t.clone() for t in state]
            return
        rho = self.cfg.decay_base ** self.cfg.every_n_steps * (step / self.total_steps) ** self.cfg.decay_pow
        torch._foreach_lerp_(self.average, state, 1 - rho)
        torch._foreach_copy_(state, self.average)

    @torch.no_grad()
    def end_epoch(self, model: nn.Module) -> None:
        if self.average is not None:
            torch._foreach_copy_(self._state(model), self.average)

    def state_dict(self) -> dict:
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.average = state["average"]
