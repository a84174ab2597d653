"""Live tensor bytes over one training step, on any device, and what they were at the peak.

The allocations are the allocator's own record: PyTorch's profiler with `profile_memory` logs every
allocation and free on the device (address, size, time), CPU and CUDA alike. Roles come from markers
the step leaves in the same record: each storage autograd saves for backward (`saved_tensors_hooks`)
becomes an activation, each new parameter gradient (post-accumulate hooks) a gradient; parameters,
buffers, optimizer state and the batch exist before the step. Replaying the record gives the live
bytes after every allocation, the peak, and its split into parameters (and buffers), gradients,
optimizer state, activations saved for backward, and transient (everything else: outputs not yet
freed, gradients in flight, decoded activations, workspaces).

Why not a TorchDispatchMode, as PyTorch's MemTracker (torch.distributed._tools.mem_tracker) is: while
any dispatch mode is active, autograd takes every tensor for a subclass (at::isTensorSubclassLike), so
it sums gradients out of place and several backward formulas take their out-of-place branch: the
backward measured is not the one that trains, and holds one map-sized buffer more at every gradient
sum (ActNN L3, resnet50 224 b64: backward peak 1147 MiB under a mode, see results/peak-memory.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

# Kineto, the profiler's backend, logs its start and stop (and, without a GPU, a device-count error) to
# stderr: noise in a run's output and in the one-paragraph errors. Read when it first starts.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

ROLES = ("params", "grads", "optimizer", "activations", "transient")
_MARK = "actmem.measure.memtrack:"  # a marker's name: _MARK + kind + ":" + storage address or phase


@dataclass
class Peak:
    bytes: int = 0  # live tensor bytes at the peak, all roles
    breakdown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    phase: str = ""  # "forward", "backward" or "optimizer": when it happened
    start_bytes: int = 0  # live bytes when tracking began (parameters, state, the batch)
    workspace: int = 0  # of the transient bytes, those an op made for itself and frees before it returns


def _mark(kind: str, value) -> None:
    with record_function(f"{_MARK}{kind}:{value}"):
        pass


def _address(t) -> int | None:
    return t.untyped_storage().data_ptr() if torch.is_tensor(t) and t.device.type != "meta" else None


class _Replay:
    """Live bytes per role, followed through the profiler's allocation record in time order."""

    def __init__(self, existing: dict[int, tuple[int, str]], phase: str):
        self.live = dict(existing)  # storage address -> (bytes, role)
        self.sums = dict.fromkeys(ROLES, 0)
        for nbytes, role in existing.values():
            self.sums[role] += nbytes
        self.total = sum(self.sums.values())
        self.phase = phase
        self.peak = Peak(self.total, dict(self.sums), phase, self.total)
        self.inside_ops: set[int] = set()  # addresses of live op workspaces
        self.workspace = 0

    def allocation(self, address: int, nbytes: int, workspace: bool) -> None:
        if nbytes > 0:
            self.live[address] = (nbytes, "transient")
            self.sums["transient"] += nbytes
            self.total += nbytes
            if workspace:
                self.inside_ops.add(address)
                self.workspace += nbytes
            if self.total > self.peak.bytes:
                self.peak = Peak(self.total, dict(self.sums), self.phase, self.peak.start_bytes, self.workspace)
        elif address in self.live:  # frees of blocks made before the step are not in the record
            size, role = self.live.pop(address)
            self.sums[role] -= size
            self.total -= size
            if address in self.inside_ops:
                self.inside_ops.remove(address)
                self.workspace -= size

    def assign(self, address: int, role: str) -> None:
        """The storage at `address` now plays `role`; parameters and buffers keep theirs."""
        if address in self.live and self.live[address][1] in ("transient", "activations"):
            size, old = self.live[address]
            self.live[address] = (size, role)
            self.sums[old] -= size
            self.sums[role] += size


def _op_end(event) -> int:
    """When the outermost aten op around an allocation returns (the allocation's own time if none)."""
    end = event.start_time_ns
    while event.parent is not None:
        event = event.parent
        if event.name.startswith("aten::"):
            end = event.end_time_ns
    return end


def _events(result, device: torch.device):
    """(time, order, kind, value) of the record's allocations on `device` -- value (address, bytes, when
    the op that made it returns) -- and of the markers, in time order."""
    stack, events = list(result.experimental_event_tree()), []
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if f.device.type == device.type and (device.index is None or f.device.index == device.index):
                events.append((e.start_time_ns, 0, "alloc", (f.ptr, f.alloc_size, _op_end(e))))
        elif e.name.startswith(_MARK):
            kind, value = e.name[len(_MARK):].split(":", 1)
            events.append((e.start_time_ns, 1, kind, value))
    return sorted(events, key=lambda ev: ev[:2])


def _workspaces(events) -> set[int]:
    """Positions in `events` of the allocations freed before the op that made them returns."""
    made: dict[int, tuple[int, int]] = {}  # address -> (position, op end) of its live allocation
    inside = set()
    for i, (time, _, kind, value) in enumerate(events):
        if kind == "alloc" and value[1] > 0:
            made[value[0]] = (i, value[2])
        elif kind == "alloc" and value[0] in made:
            position, op_end = made.pop(value[0])
            if time <= op_end:
                inside.add(position)
    return inside


def track_step(model: nn.Module, optimizer, step, inputs=(), device="cpu") -> Peak:
    """The peak of live tensor bytes while `step()` runs (forward, backward, optimizer step, zero_grad),
    counting parameters, buffers, gradients, optimizer state and `inputs` that exist before it. `step`
    calls `mark(phase)` -- it is given one -- when it moves from forward to backward to optimizer.
    Optimizer state made during the step (a first step) counts as transient: warm up first."""
    device = torch.device(device)
    state = [v for s in (optimizer.state.values() if optimizer else ()) for v in s.values()]
    params = list(model.parameters())
    existing: dict[int, tuple[int, str]] = {}
    for role, tensors in (("params", [*params, *model.buffers()]), ("grads", [p.grad for p in params]),
                          ("optimizer", state), ("transient", inputs)):
        for t in tensors:
            if torch.is_tensor(t) and t.device.type == device.type and _address(t) not in existing:
                existing[_address(t)] = (t.untyped_storage().nbytes(), role)

    def saved(t):
        _mark("activations", _address(t))
        return t

    hooks = [p.register_post_accumulate_grad_hook(lambda p: _mark("grads", _address(p.grad)))
             for p in params if p.requires_grad]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities, profile_memory=True) as prof, \
                torch.autograd.graph.saved_tensors_hooks(saved, lambda t: t):
            step(lambda phase: _mark("phase", phase))
    finally:
        for h in hooks:
            h.remove()
    replay = _Replay(existing, "forward")
    events = _events(prof.profiler.kineto_results, device)
    inside_ops = _workspaces(events)
    for i, (_, _, kind, value) in enumerate(events):
        if kind == "alloc":
            replay.allocation(value[0], value[1], i in inside_ops)
        elif kind == "phase":
            replay.phase = value
        elif value != "None":
            replay.assign(int(value), kind)
    return replay.peak
