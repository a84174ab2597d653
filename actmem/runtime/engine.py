"""One epoch of training and one evaluation pass: plain PyTorch, nothing strategy-specific."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from actmem.compress.errors import NonFiniteError
from actmem.core.errors import DivergedError
from actmem.measure import Throughput
from actmem.runtime.distributed import SINGLE, World


@dataclass
class Precision:
    """AMP settings: autocast dtype (None: fp32) and a grad scaler for fp16."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    channels_last: bool

    @classmethod
    def build(cls, amp: str, device: torch.device, channels_last: bool) -> Precision:
        dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        return cls(dtype, scaler, channels_last)

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x


@dataclass
class EpochSums:
    """What an epoch has summed so far on this rank: a mid-epoch checkpoint keeps it, so that a resumed
    epoch reports over all its batches, each counted once."""

    batches: int = 0  # batches done in this epoch
    loss: float = 0.0  # sum of per-sample losses
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0  # time of the timed steps


@dataclass
class EpochResult:
    step: int  # global optimizer step after the epoch
    loss: float  # mean training loss, over every rank's samples
    acc: float  # training top-1, percent, over every rank's samples
    img_per_s: float  # over this epoch's timed steps, summed over the ranks
    seconds: float
    sums: EpochSums  # this rank's, for a checkpoint of an epoch that stopped before its end


def _bar(loader, desc: str, enabled: bool):
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()))


@dataclass
class Learner:
    """What a training step updates and how: the model (under torchrun its DDP wrapper), the optimizer
    and its per-step schedule, the loss, the AMP settings and airbench94's lookahead (None: none)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    precision: Precision
    lookahead: object | None = None


def train_epoch(learner: Learner, loader, meter: Throughput, *, epoch: int, step: int, max_steps: int, records,
                progress: bool, world: World = SINGLE, done: EpochSums | None = None, on_step=None):
    """One epoch, or its rest: `done` is what a mid-epoch checkpoint had summed (the loader starts
    after its batches). `on_step(step, sums)` runs after every step, `sums()` giving the EpochSums so far
    (the runner's mid-epoch checkpoints). The loss and accuracy returned are over every rank's samples,
    img/s the ranks' sum."""
    learner.model.train()
    device = next(learner.model.parameters()).device
    done = done or EpochSums()
    loss_sum = torch.tensor(done.loss, device=device)
    correct = torch.tensor(done.correct, device=device, dtype=torch.long)
    seen, batches, t_epoch, t_timed = done.seen, done.batches, time.perf_counter(), done.seconds

    def sums() -> EpochSums:
        return EpochSums(batches, loss_sum.item(), int(correct.item()), seen, t_timed)

    bar = _bar(loader, f"epoch {epoch}", progress)
    for x, y in bar:
        if step >= max_steps:
            break
        x = learner.precision.prepare(x)
        meter.start()
        t0 = time.perf_counter()
        loss, out = checked_step(learner, x, y, step, epoch, world)
        step += 1
        if learner.lookahead is not None:
            learner.lookahead.after_step(learner.model, step, epoch)
        meter.stop(len(x))
        t_timed += time.perf_counter() - t0
        seen, batches = seen + len(x), batches + 1
        loss_sum += loss.detach().float() * len(x)
        correct += (out.argmax(1) == y).sum()
        _report_step(learner, records, bar, loss, step, epoch, len(x) / (time.perf_counter() - t0),
                     seen / max(t_timed, 1e-9), world)
        if on_step is not None:
            on_step(step, sums)
    bar.close()
    loss_mean, acc = _global_mean(world, loss_sum, correct, seen)
    return EpochResult(step, loss_mean, acc, world.total(seen / max(t_timed, 1e-9)), time.perf_counter() - t_epoch,
                       sums())


def checked_step(learner: Learner, x: torch.Tensor, y: torch.Tensor, step: int, epoch: int, world: World):
    """One optimizer step; (loss, logits). A NaN/Inf loss or gradient stops training before the weights
    take it (DivergedError naming the step)."""
    device, precision, optimizer = x.device, learner.precision, learner.optimizer
    try:
        with precision.autocast(device):
            out = learner.model(x)
            loss = learner.loss_fn(out, y)
    except NonFiniteError as e:
        raise DivergedError(f"training diverged at step {step + 1} (epoch {epoch}): in the forward pass an "
                            f"activation to compress was already NaN/Inf ({e}) Lower optim.lr, or check the "
                            "data; the last checkpoint is the last finished epoch.", step + 1) from None
    _check_finite(loss.detach()[None], "the training loss", step, epoch, world)
    optimizer.zero_grad(set_to_none=True)
    if precision.scaler is not None:  # fp16: the scaler skips steps with NaN/Inf gradients itself
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        loss.backward()
        grads = [p.grad for p in learner.model.parameters() if p.grad is not None]
        if grads:
            _check_finite(torch.stack(torch._foreach_norm(grads)), "a gradient, with the loss finite (it "
                          "overflowed in the backward pass; under a compressed strategy a decoded activation "
                          "can also be the cause),", step, epoch, world)
        optimizer.step()
    learner.scheduler.step()
    return loss, out


def _report_step(learner: Learner, records, bar, loss: torch.Tensor, step: int, epoch: int, step_img_s: float,
                 epoch_img_s: float, world: World) -> None:
    """A logged step's record (its loss is the global batch's: every rank logs on the same steps, a
    reduction) and the progress bar's figures."""
    logged = records.wants_step(step)
    if not (logged or bar.disable is False):
        return
    loss_now = world.sum(loss.detach().float().clone()).item() / world.size if logged else loss.item()
    if logged:
        records.log({"epoch": epoch, "step": step, "split": "train", "loss": loss_now, "acc": None,
                     "lr": learner.scheduler.get_last_lr()[0], "img_per_s": step_img_s, "time": time.time()})
    bar.set_postfix(loss=f"{loss_now:.3f}", img_s=f"{epoch_img_s:.0f}")


def _global_mean(world: World, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float]:
    """(mean loss, top-1 %) over every rank's samples, from this rank's sums: one reduction, one sync."""
    loss_all, correct_all, seen_all = world.sum(torch.stack(
        [loss_sum.double(), correct.double(), torch.tensor(float(seen), device=loss_sum.device)])).tolist()
    return loss_all / max(seen_all, 1), 100.0 * correct_all / max(seen_all, 1)


def _check_finite(values: torch.Tensor, what: str, step: int, epoch: int, world: World) -> None:
    """Stop at the first NaN/Inf, before it reaches the weights (one sync a step; GPU steps sync anyway
    to be timed). Under DDP every rank takes the decision together, so none is left waiting."""
    if not world.all_true(bool(torch.isfinite(values).all())):
        raise DivergedError(f"training diverged at step {step + 1} (epoch {epoch}): {what} is NaN or Inf"
                            f"{' on some rank' if world.distributed else ''}. Lower optim.lr (or use warm-up, "
                            "optim.warmup_epochs), or check the data; the weights were not updated by this step, "
                            "and the last checkpoint is the last finished epoch.", step + 1)


def tta_logits(model: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """airbench94's test-time augmentation: level 1 averages the logits of the image and its mirror;
    level 2 weighs that by 1/2 and, by 1/4 each, the same for the image shifted one pixel up-left and
    down-right (reflect padding): six views."""
    if level == 0:
        return model(x)
    mirrored = 0.5 * model(x) + 0.5 * model(x.flip(-1))
    if level == 1:
        return mirrored
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
    return 0.5 * mirrored + 0.25 * sum(0.5 * model(v) + 0.5 * model(v.flip(-1)) for v in shifted)


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn, precision: Precision, progress: bool, tta: int = 0,
             world: World = SINGLE):
    """Returns (mean loss, top-1 accuracy %) over the whole loader (every rank's share of the test set),
    of the logits with test-time augmentation `tta` (see tta_logits)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in _bar(loader, "eval", progress):
        with precision.autocast(device):
            out = tta_logits(model, precision.prepare(x), tta)
        loss_sum += loss_fn(out.float(), y) * len(x)
        correct += (out.argmax(1) == y).sum()
        seen += len(x)
    return _global_mean(world, loss_sum, correct, seen)
