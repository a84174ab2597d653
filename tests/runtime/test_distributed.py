"""Data-parallel training under torchrun on the CPU (gloo), end to end (issue 16, acceptance 1 and 2).

Each run goes through tests/train_probe.py (python -m actmem.train with a per-step probe): every rank
writes a digest of its parameters after every step, and one rank can be made to SIGKILL itself at a
known step. vit_tiny (LayerNorm, no BatchNorm) makes a data-parallel step equal to a single process's on
the global batch: BatchNorm would normalise with per-rank statistics."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from actmem.core.errors import ConfigError
from actmem.models import build
from actmem.runtime.setup import sync_batchnorm

PROBE = str(REPO / "tests" / "train_probe.py")
SETTING = ["dataset=synthetic", "dataset.train_size=128", "dataset.test_size=32", "model=vit_tiny",
           "+model.kwargs.depth=1", "trainer.threads=1", "trainer.progress=false", "logger=jsonl",
           "logger.log_every=1"]


def launch(run_dir, *overrides, ranks=2, env=None, timeout=600):
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                             if ranks > 1 else []), PROBE, f"hydra.run.dir={run_dir}", *SETTING, *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def traces(path, ranks):
    return [(path.parent / f"{path.name}.{r}").read_text().splitlines() for r in range(ranks)]


@pytest.mark.parametrize("strategy", ["exact", "actnn"])
def test_two_ranks_stay_identical_and_exact_matches_one_process_on_the_global_batch(tmp_path, strategy):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    res = launch(ddp, f"strategy={strategy}", "trainer.batch_size=16", "trainer.max_steps=3",
                 "trainer.measure_activations=false", env={"PROBE_TRACE": str(tmp_path / "trace")})
    assert res.returncode == 0, res.stderr[-3000:]
    rank0, rank1 = traces(tmp_path / "trace", 2)
    assert len(rank0) == 3 and rank0 == rank1  # the same parameters on both ranks after every step
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_size"] == 16 and summary["global_batch_size"] == 32
    assert summary["status"] == "completed" and summary["steps"] == 3
    if strategy != "exact":
        return
    res = launch(single, "strategy=exact", "trainer.batch_size=32", "trainer.max_steps=3",
                 "trainer.measure_activations=false", ranks=1)
    assert res.returncode == 0, res.stderr[-3000:]
    by_step = {(r["step"], r["split"], r["acc"] is None): r["loss"] for r in records(single)}
    for r in records(ddp):  # every step's loss and the epoch's train and test figures
        assert r["loss"] == pytest.approx(by_step[(r["step"], r["split"], r["acc"] is None)], rel=1e-5)
    a = torch.load(ddp / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(single / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[k], build("vit_tiny", num_classes=10, depth=1).state_dict()[k]) for k in a)


def test_a_killed_rank_fails_the_job_and_the_same_command_resumes_mid_epoch(tmp_path):
    """Rank 1 dies at step 7 (epoch 1 of 3, 4 steps an epoch, checkpoints every 2 steps): the job exits
    non-zero, summary "failed" naming rank 1; the same command resumes from step 6 and finishes, each
    epoch and each step recorded once."""
    run_dir = tmp_path / "run"
    overrides = ["strategy=actnn", "trainer.batch_size=16", "trainer.epochs=3", "trainer.checkpoint_every=2",
                 "trainer.measure_activations=false"]
    res = launch(run_dir, *overrides, env={"PROBE_DIE_AT_STEP": "7", "PROBE_DIE_RANK": "1"})
    assert res.returncode != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "rank 1" in summary["error"], summary.get("error")
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 6

    res = launch(run_dir, *overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "6 step(s) done" in res.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 3 and summary["steps"] == 12
    recs = records(run_dir)
    epochs = [(r["epoch"], r["split"]) for r in recs if r["acc"] is not None]
    assert sorted(epochs) == sorted({(e, s) for e in range(3) for s in ("train", "test")})
    steps = [r["step"] for r in recs if r["acc"] is None]
    assert steps == list(range(1, 13))


def test_a_job_stopped_by_sigterm_is_interrupted_and_resumes(tmp_path):
    """SIGTERM to torchrun (a scheduler's time limit) reaches every rank: each says it was stopped, so
    rank 0 records "interrupted", not "failed"; the same command resumes from the last checkpoint."""
    run_dir = tmp_path / "run"
    overrides = ["strategy=exact", "trainer.batch_size=16", "trainer.epochs=2", "trainer.checkpoint_every=2",
                 "trainer.measure_activations=false"]
    res = launch(run_dir, *overrides, env={"PROBE_STOP_JOB_AT_STEP": "3"})
    assert res.returncode != 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "stopped by SIGTERM", summary.get("error")
    assert f"hydra.run.dir={run_dir}" in " ".join(res.stderr.split())
    res = launch(run_dir, *overrides)
    assert res.returncode == 0 and "Resuming from" in res.stdout, res.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_a_mid_epoch_resume_trains_what_an_uninterrupted_run_trains(tmp_path):
    """One process (8 steps an epoch), killed at step 11 with checkpoints every 3 steps: resumed from step
    9, inside epoch 1, its weights and records are those of a run never stopped, bit for bit (same
    batches, same augmentation, same RNG streams for the stochastic rounding)."""
    overrides = ["strategy=actnn", "trainer.batch_size=16", "trainer.epochs=2", "trainer.checkpoint_every=3",
                 "trainer.measure_activations=false", "dataset.augment=true"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert launch(whole, *overrides, ranks=1).returncode == 0
    assert launch(stopped, *overrides, ranks=1, env={"PROBE_DIE_AT_STEP": "11"}).returncode != 0
    res = launch(stopped, *overrides, ranks=1)
    assert res.returncode == 0 and "1 epoch(s), 9 step(s) done" in res.stdout, res.stderr[-3000:]
    a = torch.load(whole / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(stopped / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    figures = lambda run: [(r["step"], r["split"], r["loss"], r["acc"]) for r in records(run)]  # noqa: E731
    assert figures(whole) == figures(stopped)


def test_sync_bn_is_refused_with_a_strategy_that_replaces_batchnorm():
    from actmem import strategies

    model = strategies.apply(build("resnet20", num_classes=10), "actnn")
    with pytest.raises(ConfigError, match="strategy=actnn.*sync_bn=false"):
        sync_batchnorm(model, "actnn")
    synced = sync_batchnorm(build("resnet20", num_classes=10), "exact")
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())


def test_sync_bn_on_the_cpu_is_refused_in_one_paragraph(tmp_path):
    res = launch(tmp_path / "run", "trainer.sync_bn=true", "trainer.max_steps=1")
    assert res.returncode != 0 and "SyncBatchNorm runs on GPUs only" in res.stderr


def test_a_failed_job_under_actmem_torchrun_ends_with_the_ranks_paragraph_and_status(tmp_path):
    """torchrun itself prints its agent's traceback and exits 1; python -m actmem.torchrun leaves the rank's
    paragraph, names the rank, and exits with its status (2: a refused setting)."""
    cmd = [sys.executable, "-m", "actmem.torchrun", "--standalone", "--nproc_per_node=2", "-m", "actmem.train",
           f"hydra.run.dir={tmp_path}", "dataset=cifar10", "dataset.root=/nonexistent", "model=vit_tiny",
           "trainer.progress=false", "logger=none"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    said = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in said, said
    assert "/nonexistent" in said and "failed: rank" in said and "exit status 2" in said, said


def test_exit_status_of_a_rank_killed_by_a_signal():
    from actmem.torchrun import exit_status

    assert exit_status(-9) == 137 and exit_status(2) == 2 and exit_status(0) == 1
