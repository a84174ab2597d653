"""The GPU machine's offline install: `make gpu-bundle` here, then scripts/gpu_run.sh --install-only in a fresh
venv that, like that machine, has torch but neither hydra, omegaconf, wandb nor actmem, with no index to
reach; then a two-step CPU training run in it. The bundle also carries CIFAR-10's tarball (../shared does not
travel), which the suite's parity section unpacks there."""
from __future__ import annotations

import filecmp
import fnmatch
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from helpers import REPO, SHARED_DATA

# What the bundle (or PYTHONPATH=<repo>) must provide: hidden from the fresh venv.
NOT_PREINSTALLED = ["hydra", "hydra_core*", "omegaconf*", "antlr4*", "hydra_plugins", "hydra_joblib_launcher*",
                    "wandb*", "__editable__*actmem*", "actmem*"]


def _gpu_like_venv(root: Path) -> Path:
    """A venv seeing .venv's site-packages except NOT_PREINSTALLED (symlinks + a .pth); returns its python.
    pip comes along with the rest, as the GPU machine's python has its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    shared = root / "preinstalled"
    shared.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in NOT_PREINSTALLED):
            (shared / entry.name).symlink_to(entry)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "preinstalled.pth").write_text(f"{shared}\n")
    return python


def _offline_env(**extra: str) -> dict[str, str]:
    """No PIP_* setting of this machine (find-links, constraints) and no index; no inherited PYTHONPATH or
    user site-packages."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PYTHONNOUSERSITE": "1", **extra}


def test_offline_bundle_installs_and_trains(tmp_path):
    wheels, data, site, run_dir = tmp_path / "wheels", tmp_path / "data", tmp_path / "site", tmp_path / "run"
    # Built afresh so a stale .gpu/wheels cannot hide a break; -o: a pyproject.toml newer than the stamp must
    # not make the test reinstall .venv.
    res = subprocess.run(["make", "-o", ".venv/.installed", "gpu-bundle", f"GPU_WHEELS={wheels}", f"GPU_DATA={data}",
                          f"SHARED={SHARED_DATA}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    built = sorted(p.name for p in wheels.iterdir())
    assert len(built) == 4 and all(name.endswith("-py3-none-any.whl") for name in built), built
    assert [p.name for p in data.iterdir()] == ["cifar10-jpg.tar.gz"]
    assert filecmp.cmp(data / "cifar10-jpg.tar.gz", SHARED_DATA / "cifar10-jpg.tar.gz", shallow=False)

    python = _gpu_like_venv(tmp_path)
    env = _offline_env()
    res = subprocess.run([python, "-c", "import hydra"], capture_output=True, text=True, env=env)
    assert res.returncode != 0, "hydra is importable before the install: the venv does not mimic the GPU machine"

    res = subprocess.run(["bash", "scripts/gpu_run.sh", "--install-only"], cwd=REPO, capture_output=True,
                         text=True, timeout=120,
                         env={**env, "GPU_RUN_PYTHON": str(python), "GPU_RUN_WHEELS": str(wheels),
                              "GPU_RUN_SITE": str(site)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no CUDA" in res.stdout and f"from {site}/hydra/" in res.stdout, res.stdout

    env["PYTHONPATH"] = f"{site}:{REPO}"
    res = subprocess.run([python, "-c", "import actmem.train, hydra, omegaconf; "
                          "print(hydra.__file__, omegaconf.__file__, actmem.__file__, sep='\\n')"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    hydra_file, omegaconf_file, actmem_file = res.stdout.split()
    assert hydra_file.startswith(f"{site}/") and omegaconf_file.startswith(f"{site}/"), res.stdout
    assert actmem_file.startswith(f"{REPO}/"), res.stdout

    res = subprocess.run([python, "-m", "actmem.train", "dataset=synthetic", "dataset.train_size=16",
                          "dataset.test_size=8", "model=resnet20", "strategy=actnn", "trainer.batch_size=8",
                          "trainer.max_steps=2", "trainer.device=cpu", "logger=none", f"hydra.run.dir={run_dir}",
                          "trainer.progress=false"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2, summary


def test_missing_wheels_say_how_to_make_them(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    res = subprocess.run(["bash", "scripts/gpu_run.sh", "--install-only"], cwd=REPO, capture_output=True,
                         text=True, timeout=120,
                         env=_offline_env(GPU_RUN_PYTHON=sys.executable, GPU_RUN_WHEELS=str(empty),
                                          GPU_RUN_SITE=str(tmp_path / "site")))
    assert res.returncode != 0
    assert "make gpu-bundle" in res.stderr and "carry `.gpu`" in res.stderr, res.stderr


def test_bundle_without_the_cifar10_tarball_says_where_it_looked(tmp_path):
    res = subprocess.run(["make", "-o", ".venv/.installed", "gpu-bundle", f"GPU_WHEELS={tmp_path / 'wheels'}",
                          f"GPU_DATA={tmp_path / 'data'}", f"SHARED={tmp_path / 'empty'}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert f"{tmp_path / 'empty'}/cifar10-jpg.tar.gz not found" in res.stderr and "SHARED=" in res.stderr, res.stderr
    assert not (tmp_path / "data").exists()
