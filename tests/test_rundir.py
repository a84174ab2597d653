"""The run directory's one owner (actmem.rundir): what a restart may do, strict records, checkpoints."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import REPO
from omegaconf import OmegaConf

from actmem.errors import ConfigError
from actmem.rundir import CHECKPOINT, PREVIOUS, RunDirectory


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
    assert directory.resume(**kwargs, device="cpu")["step"] == 8
    (tmp_path / CHECKPOINT).write_bytes(b"truncated")
    assert directory.resume(**kwargs, device="cpu")["step"] == 4
    assert directory.summary["epochs"] == 1 and directory.summary["test_acc"] == 10.0  # summary follows
    (tmp_path / PREVIOUS).write_bytes(b"")
    with pytest.raises(ConfigError, match="checkpoint.pt is unreadable .* Delete"):
        directory.resume(**kwargs, device="cpu")


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
