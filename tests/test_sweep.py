"""Sweeps through hydra-submitit-launcher (issue 16): hydra/launcher=submitit_local runs each job in its own
process, as Slurm would; a job that fails leaves the others to finish, the sweep ends non-zero naming it, and
the report lists every run with the failed one's reason. There is no Slurm here: a stub `sbatch` keeps the
script that hydra/launcher=submitit_slurm (or our preset, slurm) hands it, and refuses it."""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

import pandas as pd
import pytest
from helpers import REPO

QUICK = ["trainer.progress=false", "dataset=synthetic", "dataset.train_size=64", "dataset.test_size=16",
         "trainer.batch_size=32", "model=resnet20", "trainer.max_steps=2", "logger=none"]


def test_a_failed_job_leaves_the_others_and_the_report_lists_both(tmp_path):
    # The failing job first: the sweep must still wait for the one after it.
    res = subprocess.run([sys.executable, "-m", "actmem.train", "-m", "hydra/launcher=submitit_local",
                          f"hydra.sweep.dir={tmp_path}", *QUICK, "optim.lr=inf,0.1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert "optim.lr=inf: the learning rate must be a positive finite number" in res.stderr, res.stderr
    summaries = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")}
    assert len(summaries) == 2, summaries.keys()
    good = next(s for name, s in summaries.items() if "optim.lr=0.1" in name)
    bad = next(s for name, s in summaries.items() if "optim.lr=inf" in name)
    assert good["status"] == "completed" and good["steps"] == 2 and 0 <= good["test_acc"] <= 100, good
    assert bad["status"] == "failed" and "optim.lr=inf" in bad["error"], bad

    res = subprocess.run([sys.executable, "-m", "actmem.report", str(tmp_path), "--format", "csv"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(io.StringIO(res.stdout)).set_index("status")
    assert sorted(table.index) == ["completed", "failed"]
    assert table.loc["completed", "test_acc"] == pytest.approx(good["test_acc"])
    assert pd.isna(table.loc["completed", "reason"])
    assert table.loc["failed", "reason"] == bad["error"]


@pytest.mark.parametrize("launcher, overrides, expected", [
    ("submitit_slurm", ["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                        "hydra.launcher.timeout_min=90", "hydra.launcher.signal_delay_s=300"],
     ["--partition=gpu", "--gpus-per-node=2", "--time=90", "--signal=USR2@300"]),
    ("slurm", ["hydra.launcher.partition=a100"],
     ["--partition=a100", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=64GB",
      "--time=240", "--signal=USR2@120"]),
])
def test_slurm_launchers_hand_sbatch_their_settings(tmp_path, launcher, overrides, expected):
    """The job array sbatch would get: each setting as its #SBATCH line, the setup lines before the job."""
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    stubs = {"srun": "exit 1\n",  # only looked for: submitit wants to see Slurm
             "sbatch": f'cp "$1" {script}\necho "sbatch: error: no Slurm here" >&2\nexit 1\n'}
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    setup = 'hydra.launcher.setup=["module load cuda/12.4","export OMP_NUM_THREADS=8"]'
    res = subprocess.run([sys.executable, "-m", "actmem.train", "-m", f"hydra/launcher={launcher}",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides, setup, "dataset=synthetic",
                          "strategy=exact,actnn"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert res.returncode != 0 and "no Slurm here" in res.stderr, res.stdout + res.stderr
    lines = script.read_text().splitlines()
    sbatch = {line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")}
    assert set(expected) | {"--array=0-1%2", "--job-name=train"} <= sbatch, sbatch
    assert lines.index("module load cuda/12.4") < lines.index("export OMP_NUM_THREADS=8") < \
        next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert not list((tmp_path / "sweep").rglob("summary.json"))  # nothing ran


def test_a_relaunched_sweep_takes_its_own_jobs_back(tmp_path):
    """The same sweep started again in its directory: the completed job has nothing to do, and the job that
    was refused for an infinite lr is refused for that again -- not as "another run" (its summary keeps
    the lr as null, strict JSON, and used to differ from the inf it was started with)."""
    cmd = [sys.executable, "-m", "actmem.train", "-m", f"hydra.sweep.dir={tmp_path}", *QUICK, "optim.lr=0.1,inf"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and "optim.lr=inf" in first.stderr, first.stderr
    summaries = {p: p.read_text() for p in tmp_path.rglob("summary.json")}
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    said = " ".join(again.stderr.split())
    assert again.returncode == 1 and "holds another run" not in said and "Traceback" not in said, said
    assert "optim.lr=inf: the learning rate must be a positive finite number" in said, said
    assert "nothing to do" in again.stdout, again.stdout
    assert {p: p.read_text() for p in tmp_path.rglob("summary.json")} == summaries
