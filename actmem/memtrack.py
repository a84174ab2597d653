"""Live tensor bytes over one training step, on any device, and what they were at the peak.

On the principle of PyTorch's own MemTracker (torch.distributed._tools.mem_tracker): a
TorchDispatchMode sees every storage an op creates, a weak reference to the storage says when it is
freed, and the sum of live storages is followed op by op. MemTracker splits its peak by phase (what the
forward made vs the backward); what a user of activation compression needs is the split by role, so this
one classifies each live storage at the peak as a parameter (or buffer), a gradient, optimizer state, an
activation saved for backward (seen by `saved_tensors_hooks`), or transient (everything else: outputs not
yet freed, gradients in flight, decoded activations, workspaces). Each storage counts once, whole; a
parameter saved for backward stays a parameter.
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
    """Follows every storage on `device` made while active (and those registered with `track`), with a
    running sum of live bytes per role, so that each op costs O(1) and the peak's breakdown is a copy."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.sizes: dict[int, int] = {}  # id(storage) -> bytes, while it lives
        self.roles: dict[int, str] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.sums = dict.fromkeys(ROLES, 0)
        self.live = 0
        self.peak = Peak()
        self.phase = "forward"

    def track(self, t, role: str = "transient") -> int | None:
        """Follow t's storage (once); returns its key, None for a tensor on another device."""
        if not torch.is_tensor(t) or t.device.type != self.device.type or t.is_meta:
            return None
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self.sizes:
            self.sizes[key], self.roles[key] = storage.nbytes(), role
            self.refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))
            self.live += self.sizes[key]
            self.sums[role] += self.sizes[key]
        return key

    def assign(self, t, role: str) -> None:
        """t's storage now plays `role` (a transient saved for backward, a new gradient); parameters keep
        theirs."""
        key = self.track(t)
        if key is not None and self.roles[key] in ("transient", "activations") and self.roles[key] != role:
            self.sums[self.roles[key]] -= self.sizes[key]
            self.sums[role] += self.sizes[key]
            self.roles[key] = role

    def _freed(self, key: int) -> None:
        nbytes = self.sizes.pop(key, 0)
        self.live -= nbytes
        self.sums[self.roles.pop(key, "transient")] -= nbytes
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        if self.live > self.peak.bytes:
            self.peak = Peak(self.live, dict(self.sums), self.phase, self.peak.start_bytes)
        return out

    def pack(self, t):
        """saved_tensors_hooks pack: what autograd keeps is an activation (unless it is a parameter)."""
        self.assign(t, "activations")
        return t


def track_step(model: nn.Module, optimizer, step, inputs=(), device="cpu") -> Peak:
    """The peak of live tensor bytes while `step()` runs (forward, backward, optimizer step, zero_grad),
    counting parameters, buffers, gradients, optimizer state and `inputs` that exist before it. `step`
    calls `mark(phase)` -- it is given one -- when it moves from forward to backward to optimizer.
    Optimizer state made during the step (a first step) counts as transient: warm up first."""
    tracker = LiveTensors(device)
    state = [v for s in (optimizer.state.values() if optimizer else ()) for v in s.values()]
    params = list(model.parameters())
    for role, tensors in (("params", [*params, *model.buffers()]), ("grads", [p.grad for p in params]),
                          ("optimizer", state), ("transient", inputs)):
        for t in tensors:
            tracker.track(t, role)
    tracker.peak = Peak(tracker.live, dict(tracker.sums), "forward", tracker.live)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.assign(p.grad, "grads"))
             for p in params if p.requires_grad]

    def mark(phase: str) -> None:
        tracker.phase = phase

    try:
        with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
            step(mark)
    finally:
        for h in hooks:
            h.remove()
    return tracker.peak
