"""Live tensor bytes over one training step, on any device, and what they were at the peak.

On the principle of PyTorch's own MemTracker (torch.distributed._tools.mem_tracker): a
TorchDispatchMode sees every storage an op creates, a weak reference to the storage says when it is
freed, and the sum of live storages is followed op by op. MemTracker splits its peak by phase (what the
forward made vs the backward); what a user of activation compression needs is the split by role, so this
one classifies each live storage at the peak as a parameter (or buffer), a gradient, optimizer state, an
activation saved for backward (seen by `saved_tensors_hooks`), or transient (everything else: outputs not
yet freed, gradients in flight, decoded activations, workspaces). Each storage counts once, whole, in the
first role it has in that order.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROLES = ("params", "grads", "optimizer", "activations", "transient")


@dataclass
class Peak:
    bytes: int = 0  # live tensor bytes at the peak, all roles
    breakdown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    phase: str = ""  # "forward", "backward" or "optimizer": when it happened
    start_bytes: int = 0  # live bytes when tracking began (parameters, state, the batch)


class LiveTensors(TorchDispatchMode):
    """Follows every storage on `device` made while active (and those registered with `track`)."""

    def __init__(self, device: torch.device, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        super().__init__()
        self.device, self.model, self.optimizer = torch.device(device), model, optimizer
        self.sizes: dict[int, int] = {}  # id(storage) -> bytes, while it lives
        self.refs: dict[int, weakref.ref] = {}
        self.saved: dict[int, weakref.ref] = {}  # storages autograd keeps for backward
        self.live = 0
        self.peak = Peak()
        self.phase = "forward"

    def track(self, t) -> None:
        if not torch.is_tensor(t) or t.device.type != self.device.type or t.is_meta:
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))
        self.live += self.sizes[key]

    def _freed(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)
        self.saved.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        if self.live > self.peak.bytes:
            self._snapshot()
        return out

    def _snapshot(self) -> None:
        """Classify the live storages now: the peak's breakdown."""
        roles = {}
        state = [v for s in (self.optimizer.state.values() if self.optimizer else ()) for v in s.values()]
        groups = {"params": [*self.model.parameters(), *self.model.buffers()],
                  "grads": [p.grad for p in self.model.parameters() if p.grad is not None],
                  "optimizer": [t for t in state if torch.is_tensor(t)]}
        for role, tensors in groups.items():
            for t in tensors:
                roles.setdefault(id(t.untyped_storage()), role)
        for key in self.saved:
            roles.setdefault(key, "activations")
        breakdown = dict.fromkeys(ROLES, 0)
        for key, nbytes in self.sizes.items():
            breakdown[roles.get(key, "transient")] += nbytes
        self.peak = Peak(self.live, breakdown, self.phase, self.peak.start_bytes)

    def pack(self, t):
        """saved_tensors_hooks pack: note what autograd keeps (parameters are classified first)."""
        if torch.is_tensor(t) and t.device.type == self.device.type:
            self.track(t)
            storage = t.untyped_storage()
            self.saved[id(storage)] = self.refs[id(storage)]
        return t


def track_step(model: nn.Module, optimizer, step, inputs=(), device="cpu") -> Peak:
    """The peak of live tensor bytes while `step()` runs (forward, backward, optimizer step, zero_grad),
    counting parameters, buffers, gradients, optimizer state and `inputs` that exist before it. `step`
    calls `mark(phase)` -- it is given one -- when it moves from forward to backward to optimizer."""
    tracker = LiveTensors(device, model, optimizer)
    state = [v for s in (optimizer.state.values() if optimizer else ()) for v in s.values()]
    for t in (*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()), *state, *inputs):
        tracker.track(t)
    tracker.peak.start_bytes = tracker.live

    def mark(phase: str) -> None:
        tracker.phase = phase

    with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
        step(mark)
    if tracker.peak.bytes < tracker.peak.start_bytes:  # nothing grew: the peak is the start
        tracker._snapshot()
    return tracker.peak
