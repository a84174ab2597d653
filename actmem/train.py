"""Entry point: `python -m actmem.train [hydra overrides]` (docs/contracts.md: command line and run directory)."""
from __future__ import annotations

import copy
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import hydra
import numpy as np
import torch
import torch.nn as nn
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from actmem import data, models, strategies
from actmem.config import register_configs, validate
from actmem.data.loader import epoch_seed
from actmem.distributed import SINGLE, World, start_time
from actmem.engine import EpochSums, Precision, evaluate, train_epoch
from actmem.errors import ActmemError, ConfigError, DivergedError
from actmem.lookahead import Lookahead
from actmem.measure import Throughput, activation_bytes, peak_gpu_bytes, peak_rss_bytes, reset_peak_rss, step_peak
from actmem.optim import build_optimizer, build_scheduler, set_trainable
from actmem.rundir import RunDirectory, paragraph, rng_state

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
register_configs()
# use_cache: one time per process, so that every directory of a sweep (and a requeued job) agrees
OmegaConf.register_new_resolver("actmem_now", lambda fmt: start_time().strftime(fmt), replace=True, use_cache=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu (or auto).")
    return torch.device(name)


def check_input(model_name: str, image_shape: tuple[int, int, int], dataset_cfg) -> None:
    """Refuse, before training, an input the model was not built for: CIFAR models (and vit_tiny's
    positional embeddings) take 3x32x32; torchvision's ImageNet models any 3-channel size from 64 up
    (below that their stride-32 stem leaves 1x1 maps before the last stage). A fix names only keys this
    dataset has."""
    c, h, w = image_shape
    kind = models.info(model_name)["input"]
    name, keys = dataset_cfg.name, set(dataset_cfg.keys())
    size_key = "image_size" in keys
    if c != 3:
        fix = "set dataset.channels=3" if "channels" in keys else "use a dataset of RGB images"
        raise ConfigError(f"dataset={name} gives {c}-channel images; model={model_name} takes 3 channels ({fix}).")
    if kind == "cifar" and (h, w) != (32, 32):
        raise ConfigError(f"model={model_name} is built for 32x32 CIFAR images; dataset={name} gives {h}x{w}. "
                          + ("Use dataset.image_size=32, or" if size_key else "Use") +
                          " an ImageNet model (resnet50, ...) for this size.")
    if kind == "imagenet" and min(h, w) < 64:
        raise ConfigError(f"model={model_name} is an ImageNet model and dataset={name} gives {h}x{w} images; it "
                          "needs at least 64x64 (224x224 as published). "
                          + ("Use a larger dataset.image_size, or" if size_key else "Use") +
                          " a CIFAR model (resnet20, resnet18, ...) for 32x32.")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def measure_activations(model: nn.Module, batch, precision: Precision) -> int:
    x = precision.prepare(batch[0])
    return activation_bytes(model, x, autocast_dtype=precision.dtype)


def measure_step_peak(model: nn.Module, optimizer, batch, precision: Precision):
    """The step peak of live tensor bytes (measure.step_peak) on copies of the model and optimizer, so
    training starts untouched: the first step makes the optimizer state, the second is the one measured."""
    model, optimizer = copy.deepcopy((model, optimizer))
    x, y = precision.prepare(batch[0]), batch[1]
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # training draws as without it
        for _ in range(2):
            peak = step_peak(model, (x, y), optimizer, autocast_dtype=precision.dtype)
    return peak


def run(cfg: DictConfig, directory: RunDirectory, world: World = SINGLE) -> None:
    """Train as `cfg` says, into `directory`; under torchrun `world` is this rank's place in the job."""
    t_start = time.perf_counter()
    reset_peak_rss()
    trainer = cfg.trainer
    device = world.device(resolve_device(trainer.device))
    if trainer.sync_bn and world.distributed and device.type != "cuda":
        raise ConfigError("trainer.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only. Use "
                          "trainer.sync_bn=false on the CPU (each rank normalises with its own batch's statistics).")
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    seed_everything(cfg.seed, trainer.deterministic)
    strategy_cfg = strategies.resolve(cfg.strategy)
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

    probe = next(iter(bundle.train)) if trainer.measure_activations else None
    exact_bytes = measure_activations(model, probe, precision) if probe else None
    model = strategies.apply(model, strategy_cfg)
    if trainer.sync_bn and world.distributed:
        model = sync_batchnorm(model, cfg.strategy.name)
    strategy_bytes = measure_activations(model, probe, precision) if probe else None
    directory.update(activation_bytes=strategy_bytes, activation_bytes_exact=exact_bytes,
                     activation_ratio=exact_bytes / strategy_bytes if probe and strategy_bytes else None)

    steps_per_epoch = len(bundle.train)
    total_steps = math.ceil(trainer.epochs * steps_per_epoch)
    if trainer.max_steps is not None:
        total_steps = min(total_steps, trainer.max_steps)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, total_steps, steps_per_epoch, cfg.optim)
    lookahead = Lookahead(cfg.optim.lookahead, total_steps) if cfg.optim.lookahead.enabled else None
    train_loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    test_loss_fn = nn.CrossEntropyLoss()
    if probe:
        peak = measure_step_peak(model, optimizer, probe, precision)
        directory.update(peak_tensor_bytes=peak.bytes, peak_breakdown={**peak.breakdown, "phase": peak.phase})
    del probe
    # Rank 0 draws what a single process would; each other rank its own stream (epoch_seed at "epoch -1"
    # with its rank: no loader of that rank draws from it).
    if world.rank > 0:
        torch.manual_seed(epoch_seed(cfg.seed, -1, world.rank))
    state = directory.resume(model=model, optimizer=optimizer, scheduler=scheduler, scaler=precision.scaler,
                             lookahead=lookahead, rank=world.rank)
    start_epoch, step = (state["epoch"], state["step"]) if state else (0, 0)
    progress = state["progress"] if state else {"best_test_acc": None, "test_acc": None, "train_loss": None}
    done = EpochSums(**state["in_epoch"][world.rank]) if state and state["in_epoch"] else None
    if state and "codecs" in state["rank"]:
        strategies.load_codec_states(model, state["rank"]["codecs"])
    # A group that stops training (optim.groups[].train_epochs) leaves parameters without gradients.
    freezes = any(g.train_epochs is not None for g in cfg.optim.groups)
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=freezes) if world.distributed else model

    def save(epoch: int, step: int, in_epoch=None) -> None:
        """A checkpoint (rank 0 writes it; every rank's RNG states, codec states and epoch sums go in)."""
        ranks = world.gather({"rng": rng_state(), "codecs": strategies.codec_states(model)})
        directory.save(model=model, optimizer=optimizer, scheduler=scheduler, scaler=precision.scaler, epoch=epoch,
                       step=step, progress=progress, lookahead=lookahead, ranks=ranks,
                       in_epoch=world.gather(asdict(in_epoch)) if in_epoch else None)

    def on_step(step: int, sums) -> None:
        if trainer.checkpoint_every and step % trainer.checkpoint_every == 0 and step < total_steps:
            save(epoch, step, in_epoch=sums())
            directory.update(steps=step)

    # Short runs (smoke tests) still get a figure: at least the last two steps are timed.
    meter = Throughput(device, min(trainer.warmup_steps, max(total_steps - step - 2, 0)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for epoch in range(start_epoch, math.ceil(trainer.epochs)):
        if step >= total_steps:
            break
        bundle.train.set_epoch(epoch, start_batch=done.batches if done else 0)
        set_trainable(model, cfg.optim, epoch)
        result = train_epoch(trained, bundle.train, optimizer, scheduler, train_loss_fn, precision, meter,
                             epoch=epoch, step=step, max_steps=total_steps, records=directory,
                             progress=trainer.progress, lookahead=lookahead, world=world, done=done, on_step=on_step)
        step, done = result.step, None
        if lookahead is not None:
            lookahead.end_epoch(model)
        test_loss, test_acc = evaluate(model, bundle.test, test_loss_fn, precision, trainer.progress, world=world)
        now = time.time()
        directory.log({"epoch": epoch, "step": step, "split": "train", "loss": result.loss, "acc": result.acc,
                       "lr": scheduler.get_last_lr()[0], "img_per_s": result.img_per_s, "time": now})
        directory.log({"epoch": epoch, "step": step, "split": "test", "loss": test_loss, "acc": test_acc,
                       "lr": scheduler.get_last_lr()[0], "img_per_s": None, "time": now})
        best = max(test_acc, progress["best_test_acc"] or 0.0)
        progress = {"best_test_acc": best, "test_acc": test_acc, "train_loss": result.loss}
        if world.main:
            print(f"epoch {epoch}: train loss {result.loss:.4f} acc {result.acc:.2f}% | test loss {test_loss:.4f} "
                  f"acc {test_acc:.2f}% | {result.img_per_s:.0f} img/s", flush=True)
        if result.sums.batches < len(bundle.train):  # stopped inside the epoch: a longer restart goes on in it
            save(epoch, step, in_epoch=result.sums)
        else:
            save(epoch + 1, step)
        directory.update(epochs=epoch + 1, steps=step, **progress)
    if trainer.tta:
        final_tta(model, bundle.test, test_loss_fn, precision, directory, trainer, step, world)
    directory.finish("completed", peak_memory_bytes=world.max(peak_gpu_bytes(device)),
                     peak_rss_bytes=world.max(peak_rss_bytes()),
                     throughput_img_s=world.total(meter.img_per_s) if meter.img_per_s else None,
                     wall_time_s=time.perf_counter() - t_start)


def sync_batchnorm(model: nn.Module, strategy: str) -> nn.Module:
    """trainer.sync_bn under torchrun: the model's BatchNorms as SyncBatchNorm (statistics over the global
    batch). A strategy that put its own BatchNorm in their place (actnn, division, blpa: they keep its
    input compressed) normalises per rank, so the two are refused together."""
    own = sorted({type(m).__name__ for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in PLAIN_BATCHNORMS})
    if own:
        raise ConfigError(f"trainer.sync_bn=true cannot go with strategy={strategy}: it replaces BatchNorm with "
                          f"its own layer ({', '.join(own)}), which normalises with each rank's statistics. Use "
                          "trainer.sync_bn=false (per-rank statistics, as DIVISION's torchrun runs train), or a "
                          "strategy that leaves BatchNorm alone (exact, checkpoint, fewbit, forward_ad).")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def final_tta(model, loader, loss_fn, precision, directory, trainer, step: int, world: World) -> None:
    """The trained model's test accuracy under test-time augmentation (trainer.tta): a test record with
    "tta": level, and the summary's test_acc (the last plain evaluation stays in metrics.jsonl)."""
    loss, acc = evaluate(model, loader, loss_fn, precision, trainer.progress, tta=trainer.tta, world=world)
    epochs = directory.summary["epochs"]
    directory.log({"epoch": epochs - 1, "step": step, "split": "test", "loss": loss, "acc": acc, "lr": None,
                   "img_per_s": None, "time": time.time(), "tta": trainer.tta})
    if world.main:
        print(f"test-time augmentation (level {trainer.tta}): test loss {loss:.4f} acc {acc:.2f}%", flush=True)
    directory.update(test_acc=acc, tta=trainer.tta)


def record_refusal(directory: RunDirectory | None, run_dir: Path, cfg: DictConfig, error: str) -> None:
    """A start refused for its settings leaves its reason in a fresh directory (a sweep's report lists the
    job) and leaves a directory that holds a run, or a live process's, as it is."""
    if directory is None:
        try:
            directory = RunDirectory(run_dir, cfg, writes=int(os.environ.get("RANK", 0)) == 0)
        except ActmemError:
            return
    directory.refuse(error)


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM (what Slurm and most schedulers send at a time limit) during a run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


class JobFailed(CompactHydraException):
    """A failed job of a sweep (-m): raised instead of exiting, so that the launcher goes on with the other
    jobs and Hydra ends the sweep non-zero with this message (no traceback)."""


def _fail(status: int, message: str) -> NoReturn:
    """Print `message`; exit with `status`, or in a sweep raise JobFailed so that the other jobs still run."""
    print(message, file=sys.stderr)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(f"{message} (exit status {status})")
    sys.exit(status)


def _stopping(world: World, why: str) -> None:
    """A run that stops: further SIGINT/SIGTERM ignored (torchrun's, after the peer's death this rank is
    reporting, must not cut the report short), and `why` left for rank 0 in torchrun's store."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    world.record_stop(why)


def lost_ranks(world: World) -> str:
    """On rank 0 of a torchrun job that stopped: which other ranks failed or died first, in words ("" if
    none did: the whole job was stopped, by a scheduler or Ctrl-C)."""
    parts = []
    for rank, why in world.peers_status().items():
        if why is None:
            parts.append(f"rank {rank} stopped without a word (killed, e.g. by SIGKILL or the out-of-memory "
                         "killer)")
        elif why != "signal":
            parts.append(f"rank {rank} failed ({why})")
    return "; ".join(parts) + ("; torchrun then stopped the other ranks" if parts else "")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    directory = None
    try:
        validate(cfg)
        world = World.setup(resolve_device(cfg.trainer.device))
        # Refuses another run's directory (or a live process's, or a checkpoint it cannot resume) before
        # touching it; under torchrun only rank 0 writes.
        directory = RunDirectory(run_dir, cfg, writes=world.main, world_size=world.size)
        if directory.finished:
            if world.main:
                print(f"{run_dir} holds this run, completed ({directory.previous.get('epochs')} epoch(s)); "
                      "nothing to do. Give more trainer.epochs to train on.")
            directory.release()
            world.close()
            return
        directory.start()
    except ActmemError as e:
        record_refusal(directory, run_dir, cfg, str(e))
        _fail(2, paragraph(f"Error: {e}"))
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, _interrupt)
        except ValueError:  # not the main thread (a launcher's worker): its signals stay as they were
            pass
    try:
        run(cfg, directory, world)
    except Interrupted as e:
        _stopping(world, "signal")
        lost = lost_ranks(world) if world.main and world.distributed else ""
        if not world.main:
            sys.exit(128 + e.signum)
        directory.finish("failed" if lost else "interrupted", error=f"{lost}; this rank stopped by {e}" if lost
                         else f"stopped by {e}")
        done = f"{directory.summary['epochs']} epoch(s), {directory.summary['steps']} step(s) done"
        kept = directory.has_checkpoint
        print(paragraph(f"{'Failed: ' + lost if lost else 'Interrupted by ' + str(e)}. "
                        + (f"{run_dir} keeps its last checkpoint ({done}); run the same command with "
                           f"hydra.run.dir={run_dir} to resume from it." if kept else
                           "There is no checkpoint to resume from yet; run the command again to start over.")),
              file=sys.stderr)
        sys.exit(1 if lost else 128 + e.signum)
    except ActmemError as e:
        _stopping(world, f"{type(e).__name__}: {e}")
        failed_at = {"failed_step": e.step} if isinstance(e, DivergedError) else {}
        directory.finish("failed", error=str(e), **failed_at)
        if cfg.debug:
            raise
        _fail(2, paragraph(f"Error{'' if world.main else f' on rank {world.rank}'}: {e}"))
    except Exception as e:  # a failed run: record it, say what broke, keep the traceback behind debug=true
        error = f"{type(e).__name__}: {e}"
        _stopping(world, error)
        lost = lost_ranks(world) if world.main and world.distributed else ""
        directory.finish("failed", error=f"{lost}; here {error}" if lost else error)
        if cfg.debug:
            raise
        kept = (f"The run directory {run_dir} keeps its last checkpoint" if directory.has_checkpoint
                else f"No checkpoint was written yet, so {run_dir} holds none")
        _fail(1, paragraph(f"Run failed{'' if world.main else f' on rank {world.rank}'}: "
                           f"{lost + '; here ' if lost else ''}{error}. {kept}; run again with "
                           "debug=true for the traceback."))
    world.close()


if __name__ == "__main__":
    # hydra/launcher=submitit_* pickles main: taken from __main__ it would go by value with every global it
    # reaches (torch.backends.cudnn cannot be pickled); from the importable module it goes by name.
    from actmem.train import main as importable_main

    importable_main()
