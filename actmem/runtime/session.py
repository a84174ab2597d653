"""One training run, phase by phase: `train(cfg, directory, world)` sets up the process, builds the data
and the model, measures memory before training, converts the model by its strategy, builds the
optimization, resumes from the directory's checkpoint, trains epoch by epoch, and finishes. Each phase
is a function; what they share is a `Training`."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from actmem import data, models, strategies
from actmem.data.loader import epoch_seed
from actmem.measure import Throughput, activation_bytes, peak_gpu_bytes, peak_rss_bytes, reset_peak_rss, step_peak
from actmem.runtime.distributed import SINGLE, World
from actmem.runtime.engine import EpochSums, Learner, Precision, evaluate, train_epoch
from actmem.runtime.lookahead import Lookahead
from actmem.runtime.optim import build_optimizer, build_scheduler, set_trainable
from actmem.runtime.rundir import Progress, ResumeState, RunDirectory, rng_state
from actmem.runtime.setup import check_input, prepare_process, sync_batchnorm


@dataclass
class Training:
    """What the phases of one run build and share."""

    cfg: DictConfig
    directory: RunDirectory
    world: World
    device: torch.device
    precision: Precision
    bundle: data.DataBundle
    model: nn.Module  # the converted model (what checkpoints hold)
    learner: Learner | None = None  # its optimization; learner.model is the DDP wrapper under torchrun
    total_steps: int = 0
    progress: Progress | None = None

    def save(self, epoch: int, step: int, in_epoch: EpochSums | None = None) -> None:
        """A checkpoint (rank 0 writes it; every rank's RNG states, codec states and epoch sums go in)."""
        ranks = self.world.gather({"rng": rng_state(), "codecs": strategies.codec_states(self.model)})
        self.directory.save(model=self.model, optimizer=self.learner.optimizer, scheduler=self.learner.scheduler,
                            scaler=self.precision.scaler, epoch=epoch, step=step, progress=asdict(self.progress),
                            lookahead=self.learner.lookahead, ranks=ranks,
                            in_epoch=self.world.gather(asdict(in_epoch)) if in_epoch else None)


def train(cfg: DictConfig, directory: RunDirectory, world: World = SINGLE) -> None:
    """Train as `cfg` says, into `directory`; under torchrun `world` is this rank's place in the job."""
    t_start = time.perf_counter()
    reset_peak_rss()
    device = prepare_process(cfg, world)
    t = build_data_and_model(cfg, directory, world, device)
    probe = next(iter(t.bundle.train)) if cfg.trainer.measure_activations else None
    convert(t, probe)
    build_learner(t)
    if probe is not None:
        peak = measure_step_peak(t.model, t.learner.optimizer, probe, t.precision)
        directory.update(peak_tensor_bytes=peak.bytes, peak_breakdown={**peak.breakdown, "phase": peak.phase})
    del probe
    state = resume(t)
    meter, step = train_epochs(t, state)
    if cfg.trainer.tta:
        final_tta(t, step)
    directory.finish("completed", peak_memory_bytes=world.max(peak_gpu_bytes(device)),
                     peak_rss_bytes=world.max(peak_rss_bytes()),
                     throughput_img_s=world.total(meter.img_per_s) if meter.img_per_s else None,
                     wall_time_s=time.perf_counter() - t_start)


def build_data_and_model(cfg: DictConfig, directory: RunDirectory, world: World, device: torch.device) -> Training:
    """This rank's loaders, and the model checked against their input and initialised from the data
    where it asks to be (airbench94's whitening)."""
    trainer = cfg.trainer
    bundle = data.build(cfg.dataset, batch_size=trainer.batch_size, device=device, seed=cfg.seed, rank=world.rank,
                        world_size=world.size)
    check_input(cfg.model.name, bundle.image_shape, cfg.dataset)
    model = models.build(cfg.model.name, num_classes=bundle.num_classes, **cfg.model.kwargs).to(device)
    precision = Precision.build(trainer.amp, device, trainer.channels_last)
    if trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    models.init_from_data(cfg.model.name, model, getattr(bundle.train, "first_images", None), cfg.dataset.name)
    directory.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     world_size=world.size, global_batch_size=trainer.batch_size * world.size)
    return Training(cfg, directory, world, device, precision, bundle, model)


def convert(t: Training, probe) -> None:
    """The strategy applied to the model, with the bytes held for backward measured before and after."""
    measure = lambda: activation_bytes(t.model, t.precision.prepare(probe[0]),  # noqa: E731
                                       autocast_dtype=t.precision.dtype) if probe is not None else None
    exact_bytes = measure()
    t.model = strategies.apply(t.model, strategies.resolve(t.cfg.strategy))
    if t.cfg.trainer.sync_bn and t.world.distributed:
        t.model = sync_batchnorm(t.model, t.cfg.strategy.name)
    strategy_bytes = measure()
    t.directory.update(activation_bytes=strategy_bytes, activation_bytes_exact=exact_bytes,
                       activation_ratio=exact_bytes / strategy_bytes if exact_bytes and strategy_bytes else None)


def build_learner(t: Training) -> None:
    """Optimizer, per-step schedule, lookahead and losses for the run's length in steps."""
    cfg, steps_per_epoch = t.cfg, len(t.bundle.train)
    t.total_steps = math.ceil(cfg.trainer.epochs * steps_per_epoch)
    if cfg.trainer.max_steps is not None:
        t.total_steps = min(t.total_steps, cfg.trainer.max_steps)
    optimizer = build_optimizer(t.model, cfg.optim)
    t.learner = Learner(
        model=t.model, optimizer=optimizer, precision=t.precision,
        scheduler=build_scheduler(optimizer, t.total_steps, steps_per_epoch, cfg.optim),
        lookahead=Lookahead(cfg.optim.lookahead, t.total_steps) if cfg.optim.lookahead.enabled else None,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing))


def measure_step_peak(model: nn.Module, optimizer, batch, precision: Precision):
    """The step peak of live tensor bytes (measure.step_peak) on copies of the model and optimizer, so
    training starts untouched: the first step makes the optimizer state, the second is the one measured."""
    model, optimizer = copy.deepcopy((model, optimizer))
    x, y = precision.prepare(batch[0]), batch[1]
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # training draws as without it
        for _ in range(2):
            peak = step_peak(model, (x, y), optimizer, autocast_dtype=precision.dtype)
    return peak


def resume(t: Training) -> ResumeState:
    """Where training starts: the directory's checkpoint restored (this rank's RNG and codec states), or
    the beginning; then the model wrapped for data parallelism."""
    cfg, world = t.cfg, t.world
    # Rank 0 draws what a single process would; each other rank its own stream (epoch_seed at "epoch -1"
    # with its rank: no loader of that rank draws from it).
    if world.rank > 0:
        torch.manual_seed(epoch_seed(cfg.seed, -1, world.rank))
    learner = t.learner
    state = t.directory.resume(model=t.model, optimizer=learner.optimizer, scheduler=learner.scheduler,
                               scaler=t.precision.scaler, lookahead=learner.lookahead, rank=world.rank)
    if state.codecs is not None:
        strategies.load_codec_states(t.model, state.codecs)
    t.progress = state.progress
    if world.distributed:
        # A group that stops training (optim.groups[].train_epochs) leaves parameters without gradients.
        freezes = any(g.train_epochs is not None for g in cfg.optim.groups)
        learner.model = DistributedDataParallel(t.model, device_ids=[t.device.index] if t.device.type == "cuda"
                                                else None, find_unused_parameters=freezes)
    return state


def train_epochs(t: Training, state: ResumeState) -> tuple[Throughput, int]:
    """The epochs from the resumed position to the run's length; each ends with an evaluation, its
    records and a checkpoint. Returns the throughput meter and the step reached."""
    trainer, step = t.cfg.trainer, state.step
    done = EpochSums(**state.in_epoch) if state.in_epoch else None
    # Short runs (smoke tests) still get a figure: at least the last two steps are timed.
    meter = Throughput(t.device, min(trainer.warmup_steps, max(t.total_steps - step - 2, 0)))
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(t.device)
    for epoch in range(state.epoch, math.ceil(trainer.epochs)):
        if step >= t.total_steps:
            break
        t.bundle.train.set_epoch(epoch, start_batch=done.batches if done else 0)
        set_trainable(t.model, t.cfg.optim, epoch)

        result = train_epoch(t.learner, t.bundle.train, meter, epoch=epoch, step=step, max_steps=t.total_steps,
                             records=t.directory, progress=trainer.progress, world=t.world, done=done,
                             on_step=partial(checkpoint_within, t, epoch))
        step, done = result.step, None
        end_epoch(t, epoch, result)
    return meter, step


def checkpoint_within(t: Training, epoch: int, step: int, sums) -> None:
    """After each step: a mid-epoch checkpoint every trainer.checkpoint_every steps."""
    every = t.cfg.trainer.checkpoint_every
    if every and step % every == 0 and step < t.total_steps:
        t.save(epoch, step, in_epoch=sums())
        t.directory.update(steps=step)


def end_epoch(t: Training, epoch: int, result) -> None:
    """Evaluate, record the epoch, checkpoint: an epoch stopped before its end (trainer.max_steps, a
    fractional trainer.epochs) is checkpointed unfinished, so a longer restart goes on in it."""
    learner, step = t.learner, result.step
    if learner.lookahead is not None:
        learner.lookahead.end_epoch(t.model)
    test_loss, test_acc = evaluate(t.model, t.bundle.test, nn.CrossEntropyLoss(), t.precision, t.cfg.trainer.progress,
                                   world=t.world)
    now, lr = time.time(), learner.scheduler.get_last_lr()[0]
    t.directory.log({"epoch": epoch, "step": step, "split": "train", "loss": result.loss, "acc": result.acc,
                     "lr": lr, "img_per_s": result.img_per_s, "time": now})
    t.directory.log({"epoch": epoch, "step": step, "split": "test", "loss": test_loss, "acc": test_acc, "lr": lr,
                     "img_per_s": None, "time": now})
    t.progress = Progress(best_test_acc=max(test_acc, t.progress.best_test_acc or 0.0), test_acc=test_acc,
                          train_loss=result.loss)
    if t.world.main:
        print(f"epoch {epoch}: train loss {result.loss:.4f} acc {result.acc:.2f}% | test loss {test_loss:.4f} "
              f"acc {test_acc:.2f}% | {result.img_per_s:.0f} img/s", flush=True)
    if result.sums.batches < len(t.bundle.train):
        t.save(epoch, step, in_epoch=result.sums)
    else:
        t.save(epoch + 1, step)
    t.directory.update(epochs=epoch + 1, steps=step, **asdict(t.progress))


def final_tta(t: Training, step: int) -> None:
    """The trained model's test accuracy under test-time augmentation (trainer.tta): a test record with
    "tta": level, and the summary's test_acc (the last plain evaluation stays in metrics.jsonl)."""
    level = t.cfg.trainer.tta
    loss, acc = evaluate(t.model, t.bundle.test, nn.CrossEntropyLoss(), t.precision, t.cfg.trainer.progress,
                         tta=level, world=t.world)
    epochs = t.directory.summary["epochs"]
    t.directory.log({"epoch": epochs - 1, "step": step, "split": "test", "loss": loss, "acc": acc, "lr": None,
                     "img_per_s": None, "time": time.time(), "tta": level})
    if t.world.main:
        print(f"test-time augmentation (level {level}): test loss {loss:.4f} acc {acc:.2f}%", flush=True)
    t.directory.update(test_acc=acc, tta=level)
