"""The runner end to end, in subprocesses, as a user runs it (issue 3: acceptance 2, 4, 5, 6)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, RunsCode, run_train
from omegaconf import OmegaConf

SPEC_FIELDS = {
    "status", "dataset", "model", "strategy", "strategy_config", "batch_size", "epochs", "steps", "seed",
    "device", "test_acc", "best_test_acc", "train_loss", "activation_bytes", "activation_bytes_exact",
    "activation_ratio", "peak_tensor_bytes", "peak_breakdown", "peak_memory_bytes", "peak_rss_bytes",
    "throughput_img_s", "wall_time_s", "versions", "git_commit",
}
METRIC_FIELDS = {"epoch", "step", "split", "loss", "acc", "lr", "img_per_s", "time"}
QUICK = ["dataset=synthetic", "model=resnet20", "trainer.batch_size=128", "trainer.measure_activations=false"]


def test_smoke_run_writes_complete_summary(tmp_path):
    res = run_train("dataset=synthetic", "model=resnet20", "strategy=exact", "trainer.max_steps=5", "logger=none",
                    run_dir=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SPEC_FIELDS <= summary.keys()
    assert summary["status"] == "completed"
    assert summary["steps"] == 4 and summary["epochs"] == 1  # 512 synthetic images / 128: one epoch is 4 steps
    assert summary["device"] == "cpu" and summary["peak_memory_bytes"] is None
    assert summary["activation_bytes"] == summary["activation_bytes_exact"] > 0
    assert summary["activation_ratio"] == 1.0
    assert summary["peak_rss_bytes"] > summary["activation_bytes"]
    # exact: the step peaks early in the backward, with nearly every activation alive (the first layers'
    # backward workspaces can move it a layer or two in: 97.8 % alive when measured)
    breakdown = summary["peak_breakdown"]
    assert summary["peak_tensor_bytes"] == sum(v for k, v in breakdown.items() if k != "phase")
    assert breakdown["activations"] > 0.95 * summary["activation_bytes"] and breakdown["phase"] == "backward"
    assert summary["throughput_img_s"] > 0 and 0 <= summary["test_acc"] <= 100
    assert set(summary["versions"]) == {"python", "torch", "triton", "actmem"}
    assert summary["strategy_config"] == {"name": "exact"}
    assert (tmp_path / ".hydra" / "config.yaml").exists() and (tmp_path / "checkpoint.pt").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "test"}
    assert all(METRIC_FIELDS <= r.keys() for r in records)


@pytest.mark.parametrize("override, words", [
    ("model=nosuch", ["nosuch", "resnet20", "vit_tiny"]),
    ("strategy=nosuch", ["nosuch", "checkpoint", "exact"]),
    ("trainer.batch_size=-1", ["trainer.batch_size=-1", "positive"]),
    ("trainer.batch_size=abc", ["batch_size", "abc"]),
    ("trainer.nosuchkey=1", ["nosuchkey"]),
    ("dataset.root=/nonexistent/cifar", ["/nonexistent/cifar", "make data"]),
    ("trainer.amp=fp8", ["fp8", "bf16"]),
])
def test_bad_input_fails_with_one_paragraph(tmp_path, override, words):
    res = run_train("model=resnet20", "trainer.max_steps=1", "logger=none", override, run_dir=tmp_path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


def test_cifar10_resnet20_learns(tmp_path, cifar10_root):
    """A few hundred steps on a real CIFAR-10 subset beat chance (10%) clearly."""
    res = run_train("dataset=cifar10", f"dataset.root={cifar10_root}", "dataset.train_subset=8000",
                    "dataset.test_subset=1000", "model=resnet20", "trainer.batch_size=64", "trainer.epochs=2",
                    "optim.lr=0.05", "logger=none", run_dir=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 * (8000 // 64)
    assert summary["test_acc"] > 35.0, summary


def test_imagenet_path_runs_resnet50_on_imagenette(tmp_path, imagenette_root):
    res = run_train("dataset=imagenet", f"dataset.root={imagenette_root}", "dataset.image_size=64",
                    "dataset.test_subset=64", "dataset.workers=2", "model=resnet50", "trainer.batch_size=16",
                    "trainer.max_steps=3", "logger=none", run_dir=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3 and summary["dataset"] == "imagenet"


@pytest.mark.parametrize("signum, status, code", [(signal.SIGKILL, "running", -signal.SIGKILL),
                                                  (signal.SIGTERM, "interrupted", 128 + signal.SIGTERM),
                                                  (signal.SIGINT, "interrupted", 128 + signal.SIGINT)])
def test_killed_or_interrupted_run_resumes_from_last_checkpoint(tmp_path, signum, status, code):
    """SIGKILL leaves "running" (nothing can record it); SIGTERM (a scheduler's time limit) and SIGINT
    (Ctrl-C) record "interrupted" and exit 128 + the signal. Each resumes from the last epoch."""
    overrides = ["dataset=synthetic", "dataset.train_size=1024", "dataset.test_size=64", "model=resnet20",
                 "trainer.batch_size=32", "trainer.epochs=3", "logger=jsonl", "logger.log_every=1",
                 "trainer.measure_activations=false"]
    cmd = [sys.executable, "-m", "actmem.train", f"hydra.run.dir={tmp_path}", "trainer.progress=false", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    # Wait until the first epoch is checkpointed and the second is half done, then kill it hard.
    while time.time() < deadline:
        if (tmp_path / "checkpoint.pt").exists() and metrics.exists():
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
            if any(r["epoch"] == 1 and r["step"] >= 48 for r in records):
                break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and "Traceback" not in err, err
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == status
    if status == "interrupted":
        assert f"hydra.run.dir={tmp_path}" in " ".join(err.split()), err

    res = run_train(*overrides, run_dir=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Resuming from" in res.stdout and "1 epoch(s), 32 step(s) done" in res.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 3 and summary["steps"] == 96
    assert SPEC_FIELDS <= summary.keys() and summary["test_acc"] is not None


def test_multirun_gives_each_run_its_own_directory(tmp_path):
    cmd = [sys.executable, "-m", "actmem.train", "-m", f"hydra.sweep.dir={tmp_path}", "trainer.progress=false",
           "dataset=synthetic", "model=resnet20", "trainer.max_steps=2", "logger=none", "strategy=exact,checkpoint"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    summaries = sorted(tmp_path.rglob("summary.json"))
    names = [s.parent.name for s in summaries]  # named after the overrides
    expected = "dataset=synthetic,model=resnet20,strategy={},trainer.max_steps=2"
    assert names == [expected.format(n) for n in ("checkpoint", "exact")]
    ratio = json.loads(summaries[0].read_text())["activation_ratio"]
    assert ratio > 1.0


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("strategy", ["exact", "actnn"])
def test_a_diverged_run_fails_naming_its_step_with_strict_json(tmp_path, strategy):
    res = run_train("dataset=synthetic", "model=resnet20", f"strategy={strategy}", "optim.lr=1e9",
                    "trainer.max_steps=8", "logger=jsonl", "logger.log_every=1", run_dir=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    summary = _strict_json(tmp_path / "summary.json")
    assert summary["status"] == "failed" and isinstance(summary["failed_step"], int), summary
    assert f"diverged at step {summary['failed_step']}" in res.stderr and "optim.lr" in res.stderr
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))


def test_an_infinite_learning_rate_is_refused_before_training(tmp_path):
    res = run_train("dataset=synthetic", "model=resnet20", "optim.lr=inf", "logger=none", run_dir=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "optim.lr=inf" in res.stderr, res.stderr
    assert _strict_json(tmp_path / "summary.json")["status"] == "failed"


def test_a_run_directory_holds_one_run(tmp_path):
    """Another strategy or batch size in a used directory is refused before anything there is touched;
    a completed run started again is left as it is; more epochs resume it."""
    base = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=16", "model=resnet20",
            "trainer.batch_size=32", "logger=none", "trainer.measure_activations=false"]
    assert run_train(*base, run_dir=tmp_path).returncode == 0
    finished = (tmp_path / "summary.json").read_text()
    for other in ("strategy=actnn", "trainer.batch_size=16"):
        res = run_train(*base, other, run_dir=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert "holds another run" in res.stderr and other.split("=")[0] in res.stderr, res.stderr
        assert (tmp_path / "summary.json").read_text() == finished
    res = run_train(*base, run_dir=tmp_path)
    assert res.returncode == 0 and "nothing to do" in res.stdout, res.stdout + res.stderr
    assert (tmp_path / "summary.json").read_text() == finished  # its throughput and wall time stay
    res = run_train(*base, "trainer.epochs=2", run_dir=tmp_path)
    assert res.returncode == 0 and "Resuming from" in res.stdout, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["steps"] == 4


def test_an_unreadable_checkpoint_falls_back_to_the_one_before_or_says_how_to_start_over(tmp_path):
    base = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=16", "model=resnet20",
            "trainer.batch_size=32", "logger=none", "trainer.measure_activations=false"]
    assert run_train(*base, "trainer.epochs=2", run_dir=tmp_path).returncode == 0
    latest, previous = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    res = run_train(*base, "trainer.epochs=3", run_dir=tmp_path)
    assert res.returncode == 0 and "checkpoint.pt is unreadable" in res.stdout, res.stdout + res.stderr
    assert "1 epoch(s), 2 step(s) done" in res.stdout  # from the checkpoint before
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 3

    latest.write_bytes(b"not a checkpoint")
    previous.write_bytes(b"")
    res = run_train(*base, "trainer.epochs=4", run_dir=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{latest} is unreadable" in " ".join(res.stderr.split()) and "Delete" in res.stderr, res.stderr


@pytest.mark.parametrize("model, size, says", [
    ("resnet20", 224, "built for 32x32"), ("vit_tiny", 64, "built for 32x32"), ("resnet50", 32, "at least 64x64"),
    ("resnet20", 1, "built for 32x32")])
def test_an_input_size_the_model_was_not_built_for_is_refused_before_training(tmp_path, model, size, says):
    res = run_train("dataset=synthetic", f"dataset.image_size={size}", "dataset.train_size=8", "dataset.test_size=8",
                    "trainer.batch_size=8", f"model={model}", "logger=none", run_dir=tmp_path)
    said = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in said and says in said and f"{size}x{size}" in said, said
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 0


def test_a_summary_path_that_is_not_a_file_is_refused_with_a_paragraph(tmp_path):
    (tmp_path / "summary.json").mkdir()
    res = run_train("dataset=synthetic", "model=resnet20", "trainer.max_steps=1", "logger=none", run_dir=tmp_path)
    said = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in said and f"{tmp_path / 'summary.json'} is unreadable" in said


def test_a_run_that_breaks_in_training_records_failed_and_says_whether_a_checkpoint_was_kept(tmp_path):
    """Any other error (here one the test probe raises after step 1) fails the run with one paragraph and
    a `failed` summary; with no epoch finished it must not claim a checkpoint."""
    cmd = [sys.executable, str(REPO / "tests" / "train_probe.py"), f"hydra.run.dir={tmp_path}", *QUICK,
           "trainer.max_steps=2", "logger=none", "trainer.progress=false"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PROBE_FAIL_AT_STEP": "1"})
    said = " ".join(res.stderr.split())
    assert res.returncode == 1 and "Traceback" not in said and "Run failed: RuntimeError" in said, said
    assert "No checkpoint was written yet" in said and not (tmp_path / "checkpoint.pt").exists()
    summary = _strict_json(tmp_path / "summary.json")
    assert summary["status"] == "failed" and "injected by the probe" in summary["error"]


def test_measuring_memory_before_training_leaves_the_training_draws_alone(tmp_path):
    """The activation and step-peak probes run steps of their own: with stochastic rounding (actnn) the run
    must train the same with and without them."""
    base = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=16", "model=resnet20", "strategy=actnn",
            "trainer.batch_size=32", "logger=none"]
    losses = []
    for measure in ("true", "false"):
        res = run_train(*base, f"trainer.measure_activations={measure}", run_dir=tmp_path / measure)
        assert res.returncode == 0, res.stderr
        losses.append(json.loads((tmp_path / measure / "summary.json").read_text())["train_loss"])
    assert losses[0] == losses[1]


def test_airbench94_recipe_runs_its_pieces_end_to_end(tmp_path):
    """experiment=airbench94 on small synthetic data, 8 steps an epoch: the whitening conv set from the
    training images and frozen, its bias frozen after epoch 3, the lookahead from epoch 3 on (in the
    checkpoint), and the summary's test_acc the final test-time-augmented evaluation."""
    from actmem import models
    from actmem.data.synthetic import SyntheticConfig, build_synthetic
    from actmem.models.airbench import init_whitening_

    overrides = ["experiment=airbench94", "dataset=synthetic", "dataset.train_size=512", "dataset.test_size=64",
                 "trainer.batch_size=64", "trainer.measure_activations=false", "logger=jsonl"]
    for epochs in (3, 4):  # 3, then resumed to 4 (trainer.epochs may change on a restart)
        res = run_train(*overrides, f"trainer.epochs={epochs}", run_dir=tmp_path)
        assert res.returncode == 0, res.stderr
        ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        if epochs == 3:
            after_3 = ckpt["model"]
            assert ckpt["lookahead"] is None or ckpt["lookahead"]["average"] is None
    state = ckpt["model"]
    assert ckpt["lookahead"]["average"] is not None
    assert torch.equal(state["whiten.bias"], after_3["whiten.bias"])
    assert not torch.equal(state["layers.0.conv1.weight"], after_3["layers.0.conv1.weight"])
    bundle = build_synthetic(OmegaConf.structured(SyntheticConfig(train_size=512, test_size=64)), batch_size=64,
                             device=torch.device("cpu"), seed=0)
    reference = models.build("airbench94", num_classes=10)
    init_whitening_(reference.whiten, bundle.train.first_images(5000))
    torch.testing.assert_close(state["whiten.weight"], reference.whiten.weight)
    summary = json.loads((tmp_path / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tta = [r for r in records if r.get("tta")]
    assert summary["status"] == "completed" and summary["steps"] == 32 and summary["tta"] == 2
    assert tta[-1]["split"] == "test" and summary["test_acc"] == tta[-1]["acc"]



def test_raising_max_steps_trains_on_from_where_a_stopped_run_left(tmp_path):
    """A run stopped by trainer.max_steps inside an epoch checkpoints that epoch unfinished: a restart with
    more steps goes on in it (it used to be saved as finished, and the restart trained nothing), and the
    epoch's records appear once."""
    assert run_train(*QUICK, "trainer.max_steps=2", "logger=none", run_dir=tmp_path).returncode == 0
    res = run_train(*QUICK, "trainer.max_steps=4", "logger=none", run_dir=tmp_path)
    assert res.returncode == 0 and "0 epoch(s), 2 step(s) done" in res.stdout, res.stdout + res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["epochs"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records if r["split"] == "test"] == [(0, 4)]


def test_a_crafted_checkpoint_runs_no_code_and_the_refusal_changes_nothing(tmp_path):
    assert run_train(*QUICK, "trainer.max_steps=1", "logger=none", run_dir=tmp_path).returncode == 0
    marker = tmp_path / "code_ran"
    torch.save({"model": {}, "ranks": [{"rng": RunsCode(marker)}]}, tmp_path / "checkpoint.pt")
    kept = {name: (tmp_path / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "checkpoint.pt")}
    res = run_train(*QUICK, "trainer.max_steps=2", "logger=none", run_dir=tmp_path)
    said = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in said and "can run code" in said, said
    assert not marker.exists()
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept


def test_a_bad_wandb_mode_is_refused_before_the_run_starts(tmp_path):
    res = run_train(*QUICK, "trainer.max_steps=1", "logger=wandb", "logger.mode=bogus", run_dir=tmp_path)
    said = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in said and "logger.mode='bogus'" in said, said
    summary = json.loads((tmp_path / "summary.json").read_text())  # a fresh directory says why; not "running"
    assert summary["status"] == "failed" and "logger.mode" in summary["error"]


def test_input_size_hints_name_only_keys_the_dataset_has():
    from actmem.core.errors import ConfigError
    from actmem.runtime.setup import check_input

    cifar = OmegaConf.create({"name": "cifar10", "root": "data/cifar10"})
    synthetic = OmegaConf.create({"name": "synthetic", "image_size": 64, "channels": 1})
    with pytest.raises(ConfigError) as refused:
        check_input("resnet50", (3, 32, 32), cifar)
    assert "image_size" not in str(refused.value) and "CIFAR model" in str(refused.value)
    with pytest.raises(ConfigError, match="dataset.image_size=32"):
        check_input("resnet20", (3, 64, 64), synthetic)
    with pytest.raises(ConfigError, match="dataset.channels=3"):
        check_input("resnet20", (1, 32, 32), synthetic)
    with pytest.raises(ConfigError) as refused:
        check_input("resnet20", (1, 32, 32), cifar)
    assert "dataset.channels" not in str(refused.value)
