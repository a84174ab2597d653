"""What training costs: bytes held for backward, peak memory, throughput -- all measured.

`activation_bytes` counts, during one forward pass, every tensor that autograd saves for backward
(through `saved_tensors_hooks`, so custom Functions that `save_for_backward` their packed codes are
counted by the real size of those codes). Each storage is counted once, at its full size (a saved view
keeps its whole storage alive); parameters and buffers are not activations and are left out.
"""
from __future__ import annotations

import copy
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from actmem.measure.memtrack import Peak, track_step


def _batch_input(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@contextmanager
def _module_scope(model: nn.Module):
    """Track which module is running, so each saved tensor can be charged to a layer: a stack of (name,
    elements of the call's largest tensor input)."""
    stack = [("(outside)", 0)]
    names = {m: n or "(model)" for n, m in model.named_modules()}

    def pre(module, args):
        stack.append((names[module], max((a.numel() for a in args if torch.is_tensor(a)), default=0)))

    def post(module, args, out):
        stack.pop()  # returns nothing: a forward hook's return value would replace the output

    handles = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Saved:
    """One storage autograd keeps for backward."""
    module: str  # the innermost module running when it was saved
    nbytes: int  # of the whole storage
    dtype: torch.dtype
    input_numel: int  # elements of that module call's largest tensor input, to tell data from metadata

    @property
    def numel(self) -> int:
        return self.nbytes // self.dtype.itemsize


def saved_tensors(model: nn.Module, batch, *, autocast_dtype: torch.dtype | None = None) -> list[Saved]:
    """What one forward pass keeps for backward, each storage once. The model runs in its current mode;
    its state (e.g. BatchNorm statistics) and the RNG are left as they were."""
    x = _batch_input(batch)
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, Saved] = {}
    state = copy.deepcopy(model.state_dict())
    with _module_scope(model) as stack, torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in excluded and ptr not in seen:
                seen[ptr] = Saved(stack[-1][0], storage.nbytes(), t.dtype, stack[-1][1])
            return t.detach()  # holding t itself would tie the graph into a cycle that outlives the call

        autocast = torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            out = model(x)
        del out
    model.load_state_dict(state)
    return list(seen.values())


def saved_bytes_by_module(model: nn.Module, batch, **kw) -> dict[str, int]:
    """Bytes held for backward by one forward pass (`saved_tensors`), per module."""
    per_module: dict[str, int] = defaultdict(int)
    for s in saved_tensors(model, batch, **kw):
        per_module[s.module] += s.nbytes
    return dict(per_module)


def activation_bytes(model: nn.Module, batch, **kw) -> int:
    """Bytes held for backward by one forward pass of `model` on `batch` (docs/contracts.md)."""
    return sum(saved_bytes_by_module(model, batch, **kw).values())


def train_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer, *,
               autocast_dtype: torch.dtype | None = None, loss_fn=nn.functional.cross_entropy,
               mark=lambda phase: None) -> None:
    """One plain training step (forward, backward, optimizer step, zero_grad): what memory is measured
    on. `mark(phase)` is told when it moves on to "backward" and "optimizer"."""
    x, y = batch
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = loss_fn(model(x), y)
    mark("backward")
    loss.backward()
    del loss
    mark("optimizer")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_peak(model: nn.Module, batch, optimizer: torch.optim.Optimizer, **kw) -> Peak:
    """The peak of live tensor bytes during one `train_step` of `model` on `batch` (its keywords apply),
    split by role (actmem.measure.memtrack). It is a real step: the weights, optimizer state and BatchNorm
    statistics move, as in training."""
    model.train()
    return track_step(model, optimizer, lambda mark: train_step(model, batch, optimizer, mark=mark, **kw),
                      inputs=batch, device=batch[0].device)


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: VmHWM), so that the runs of a sweep, which Hydra runs
    one after another in one process, each get their own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last reset_peak_rss (or its start)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_gpu_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class Throughput:
    """Images per second over the steps after `warmup` (which include one-off costs: allocation,
    kernel compilation, caches). GPU steps are timed after a synchronise."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.steps = self.images = 0
        self.seconds = 0.0
        self._t0 = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self, images: int):
        self._sync()
        self.steps += 1
        if self.steps > self.warmup:
            self.seconds += time.perf_counter() - self._t0
            self.images += images

    @property
    def img_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None
