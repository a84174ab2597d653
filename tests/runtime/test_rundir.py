"""The run directory's one owner (actmem.runtime.rundir): what a restart may do, strict records, checkpoints."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import REPO, RunsCode
from omegaconf import OmegaConf

from actmem.core.errors import ConfigError
from actmem.runtime.rundir import CHECKPOINT, PREVIOUS, RunDirectory


def config(**trainer):
    return OmegaConf.create({
        "dataset": {"name": "synthetic"}, "model": {"name": "resnet20"}, "strategy": {"name": "exact"},
        "seed": 0, "logger": {"name": "jsonl", "log_every": 1},
        "trainer": {"batch_size": 32, "epochs": 1, "max_steps": None, "progress": False, **trainer}})


def started(path, cfg):
    directory = RunDirectory(path, cfg)
    directory.start()
    return directory


def test_a_restart_may_change_the_length_only_and_a_finished_run_is_left_alone(tmp_path):
    started(tmp_path, config()).finish("completed", epochs=1)
    assert RunDirectory(tmp_path, config()).finished
    longer = RunDirectory(tmp_path, config(epochs=3, progress=True))  # the same run, trained on
    assert not longer.finished and longer.previous["status"] == "completed"
    longer.release()
    with pytest.raises(ConfigError, match=r"holds another run.*trainer\.batch_size=32 there, 64 now"):
        RunDirectory(tmp_path, config(batch_size=64))


def test_records_are_strict_json_and_the_logger_decides_the_step_records(tmp_path):
    directory = started(tmp_path, config())
    assert directory.wants_step(3)  # logger=jsonl, log_every=1
    (tmp_path / "quiet").mkdir()
    quiet = config()
    quiet.logger.name = "none"  # epoch records only
    assert not started(tmp_path / "quiet", quiet).wants_step(3)
    directory.log({"epoch": 0, "step": 1, "split": "train", "loss": math.nan})
    directory.finish("failed", train_loss=math.inf)
    refuse = lambda c: pytest.fail(f"not strict JSON: {c}")  # noqa: E731
    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)["train_loss"] is None
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=refuse)["loss"] is None


def test_resume_falls_back_to_the_checkpoint_before_an_unreadable_one(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    directory = started(tmp_path, config())
    kwargs = dict(model=model, optimizer=opt, scheduler=sched, scaler=None)
    directory.save(**kwargs, epoch=1, step=4, progress={"test_acc": 10.0})
    directory.save(**kwargs, epoch=2, step=8, progress={"test_acc": 20.0})
    directory.release()

    def restarted():
        again = RunDirectory(tmp_path, config())
        again.start()
        return again, again.resume(**kwargs)

    again, state = restarted()
    assert state.step == 8
    again.release()
    (tmp_path / CHECKPOINT).write_bytes(b"truncated")
    again, state = restarted()
    assert state.step == 4
    assert again.summary["epochs"] == 1 and again.summary["test_acc"] == 10.0  # summary follows
    again.release()
    (tmp_path / PREVIOUS).write_bytes(b"")
    with pytest.raises(ConfigError, match="checkpoint.pt is unreadable .* Delete"):
        RunDirectory(tmp_path, config())


def test_a_crafted_checkpoint_is_refused_and_runs_no_code(tmp_path):
    started(tmp_path, config()).finish("interrupted")
    marker = tmp_path / "code_ran"
    torch.save({"model": {}, "ranks": [{"rng": RunsCode(marker)}]}, tmp_path / CHECKPOINT)
    with pytest.raises(ConfigError, match=r"checkpoint.pt was not loaded: .*can run code.*fresh directory"):
        RunDirectory(tmp_path, config())
    assert not marker.exists()
    torch.load(tmp_path / CHECKPOINT, weights_only=False)  # the same file runs code when unpickled the old way
    assert marker.exists()


def test_a_checkpoint_holds_only_what_the_safe_loader_reads_and_restores_every_rng(tmp_path):
    import random

    import numpy as np

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    kwargs = dict(model=model, optimizer=opt, scheduler=sched, scaler=torch.amp.GradScaler("cpu"))
    directory = started(tmp_path, config())
    directory.save(**kwargs, epoch=1, step=4, progress={"test_acc": 10.0})
    directory.release()
    draws = lambda: (torch.rand(3).tolist(), random.random(), np.random.rand(3).tolist())  # noqa: E731
    expected = draws()  # what follows the saved states
    torch.load(tmp_path / CHECKPOINT, weights_only=True)  # the safe loader reads the whole file
    again = RunDirectory(tmp_path, config())
    again.start()
    again.resume(**kwargs)
    assert draws() == expected


def test_a_refused_restart_leaves_the_directory_as_it_was(tmp_path):
    """Another number of ranks, or an unreadable checkpoint: refused before summary.json is rewritten."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    directory = started(tmp_path, config())
    directory.save(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1), scaler=None,
                   epoch=1, step=4, progress={})
    directory.finish("interrupted")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="trained with 1 process"):
        RunDirectory(tmp_path, config(), world_size=2)
    (tmp_path / CHECKPOINT).write_bytes(b"x")
    before[CHECKPOINT] = b"x"
    (tmp_path / PREVIOUS).write_bytes(b"")
    before[PREVIOUS] = b""
    with pytest.raises(ConfigError, match="unreadable"):
        RunDirectory(tmp_path, config())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_one_live_process_owns_a_directory_and_a_dead_owner_reads_as_killed(tmp_path):
    from actmem.runtime.rundir import owner_alive

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from omegaconf import OmegaConf; from actmem.runtime.rundir import RunDirectory; "
        f"d = RunDirectory(sys.argv[1], OmegaConf.create({dict(config())!r})); d.start(); print('ready', flush=True); "
        "time.sleep(60)"), str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert owner_alive(tmp_path) is True
        with pytest.raises(ConfigError, match=rf"is in use: pid {holder.pid} on .* is running in it now"):
            RunDirectory(tmp_path, config())
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "running"  # as the killed process left it
    assert owner_alive(tmp_path) is False
    assert RunDirectory(tmp_path, config()).killed


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_output_directory_that_cannot_be_created_is_refused_with_a_paragraph(tmp_path, key):
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "run"
    cmd = [sys.executable, "-m", "actmem.train", *(["-m"] if key == "hydra.sweep.dir" else []), f"{key}={bad}",
           "dataset=synthetic", "trainer.max_steps=1", "logger=none"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    said = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in said, said
    assert f"{key}={bad} cannot be used" in said and "Not a directory" in said, said
