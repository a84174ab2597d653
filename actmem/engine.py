"""One epoch of training and one evaluation pass: plain PyTorch, nothing strategy-specific."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from actmem.errors import DivergedError, NonFiniteError
from actmem.measure import Throughput


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
class EpochResult:
    step: int  # global optimizer step after the epoch
    loss: float  # mean training loss
    acc: float  # training top-1, percent
    img_per_s: float  # over this epoch's timed steps
    seconds: float


def _bar(loader, desc: str, enabled: bool):
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()))


def train_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn, precision: Precision,
                meter: Throughput, *, epoch: int, step: int, max_steps: int, records, progress: bool,
                lookahead=None):
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, t_epoch, t_timed = 0, time.perf_counter(), 0.0
    bar = _bar(loader, f"epoch {epoch}", progress)
    for x, y in bar:
        if step >= max_steps:
            break
        x = precision.prepare(x)
        meter.start()
        t0 = time.perf_counter()
        try:
            with precision.autocast(device):
                out = model(x)
                loss = loss_fn(out, y)
        except NonFiniteError as e:
            raise DivergedError(f"training diverged at step {step + 1} (epoch {epoch}): in the forward pass an "
                                f"activation to compress was already NaN/Inf ({e}) Lower optim.lr, or check the "
                                "data; the last checkpoint is the last finished epoch.", step + 1) from None
        _check_finite(loss.detach()[None], "the training loss", step, epoch)
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:  # fp16: the scaler skips steps with NaN/Inf gradients itself
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                _check_finite(torch.stack(torch._foreach_norm(grads)), "a gradient, with the loss finite (it "
                              "overflowed in the backward pass; under a compressed strategy a decoded activation "
                              "can also be the cause),", step, epoch)
            optimizer.step()
        scheduler.step()
        step += 1
        if lookahead is not None:
            lookahead.after_step(model, step, epoch)
        meter.stop(len(x))
        t_timed += time.perf_counter() - t0
        n = len(x)
        seen += n
        loss_sum += loss.detach().float() * n
        correct += (out.argmax(1) == y).sum()
        if records.wants_step(step) or bar.disable is False:
            loss_now = loss.item()
            if records.wants_step(step):
                records.log({"epoch": epoch, "step": step, "split": "train", "loss": loss_now, "acc": None,
                            "lr": scheduler.get_last_lr()[0], "img_per_s": n / (time.perf_counter() - t0),
                            "time": time.time()})
            bar.set_postfix(loss=f"{loss_now:.3f}", img_s=f"{seen / max(t_timed, 1e-9):.0f}")
    bar.close()
    mean_loss = (loss_sum / max(seen, 1)).item()
    acc = 100.0 * correct.item() / max(seen, 1)
    return EpochResult(step, mean_loss, acc, seen / max(t_timed, 1e-9), time.perf_counter() - t_epoch)


def _check_finite(values: torch.Tensor, what: str, step: int, epoch: int) -> None:
    """Stop at the first NaN/Inf, before it reaches the weights (one sync a step; GPU steps sync anyway
    to be timed)."""
    if not bool(torch.isfinite(values).all()):
        raise DivergedError(f"training diverged at step {step + 1} (epoch {epoch}): {what} is NaN or Inf. Lower "
                            "optim.lr (or use warm-up, optim.warmup_epochs), or check the data; the weights were "
                            "not updated by this step, and the last checkpoint is the last finished epoch.",
                            step + 1)


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
def evaluate(model: nn.Module, loader, loss_fn, precision: Precision, progress: bool, tta: int = 0):
    """Returns (mean loss, top-1 accuracy %) over the whole loader, of the logits with test-time
    augmentation `tta` (see tta_logits)."""
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
    return (loss_sum / max(seen, 1)).item(), 100.0 * correct.item() / max(seen, 1)
