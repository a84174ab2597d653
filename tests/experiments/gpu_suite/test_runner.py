"""The suite's runner: section choice, refusals, time limits, budget, files; and the profile section's
kernel accounting. Sections run in child processes, as on the GPU."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from actmem.experiments.gpu_suite import profile, record, runner
from actmem.experiments.gpu_suite.base import Section, Table

FAKES = Path(__file__).parent
PROV = record.Provenance("none", "unknown", "torch", "triton", "3", "abc123", "python scripts/gpu_suite.py",
                             dry_run=True)


@pytest.fixture
def fakes(monkeypatch):
    """fake_sections, importable here and in the sections' processes."""
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKES), os.environ.get("PYTHONPATH")])))
    return importlib.import_module("fake_sections")


def test_only_selects_in_order_of_importance():
    sections = runner.load_sections()
    assert list(sections) == list(runner.SECTION_MODULES)
    assert [s.name for s in runner.select(sections, "profile,correctness")] == ["correctness", "profile"]
    assert [s.name for s in runner.select(sections, None)] == list(runner.SECTION_MODULES)


def test_unknown_section_lists_the_valid_ones(capsys):
    assert runner.main(["--only", "correctness,bogus"]) == 2
    err = capsys.readouterr().err
    assert "'bogus'" in err and "valid sections: correctness, training, kernels, profile, maxbatch, parity" in err


@pytest.mark.parametrize("budget", ["0", "-30", "nan", "inf"])
def test_a_budget_that_is_not_a_positive_finite_number_is_refused(budget, capsys, tmp_path, monkeypatch):
    """Zero or less used to skip every section and still exit 0; infinity would never stop. Refused before
    the dry run sets its environment (which would put every later test of this process on the Triton
    interpreter)."""
    monkeypatch.delenv("ACTMEM_BACKEND", raising=False)
    assert runner.main(["--dry-run", "--budget", budget, "--out", str(tmp_path)]) == 2
    assert "ACTMEM_BACKEND" not in os.environ
    assert capsys.readouterr().err == (f"gpu_suite: --budget {float(budget):g} is not a time limit: give a positive, "
                                       "finite number of seconds, e.g. --budget 600.\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_to_measure_without_a_gpu(capsys):
    assert runner.main(["--only", "kernels"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_overrun_is_stopped_and_the_next_sections_still_run(fakes, tmp_path):
    sections = [Section("sleepy", 12, fakes.sleepy), Section("broken", 60, fakes.broken),
                Section("quick", 60, fakes.quick)]
    outcomes = runner.run(sections, tmp_path, PROV, budget=200, dry_run=True)
    assert [o.status for o in outcomes] == ["stopped at time limit", "crashed (exit 1)", "ok"]
    assert outcomes[0].seconds >= 12 and outcomes[0].seconds < 30
    sleepy = (tmp_path / "gpu-sleepy.md").read_text()
    assert "**stopped at time limit** (12 s)" in sleepy and "| first |" in sleepy  # what it saved survives
    assert "RuntimeError: boom" in (tmp_path / "gpu-broken.md").read_text()
    quick = (tmp_path / "gpu-quick.md").read_text()
    assert quick.startswith("# GPU suite: quick\n") and "DRY RUN" in quick and "- commit: abc123" in quick
    assert "| 1 | 2 |" in quick
    assert "| sleepy | stopped at time limit |" in runner.summary(outcomes)
    assert not list(tmp_path.glob(".gpu-*"))  # no partial files left behind


def test_spent_budget_skips_the_section_and_says_so(fakes, tmp_path):
    outcomes = runner.run([Section("quick", 60, fakes.quick)], tmp_path, PROV, budget=5, dry_run=True)
    assert outcomes[0].status.startswith("skipped")
    assert "skipped" in (tmp_path / "gpu-quick.md").read_text()


def test_table_escapes_cells():
    table = Table("name", "note")
    table.add("a|b", "two\nlines")
    assert str(table) == "| name | note |\n|---|---|\n| a\\|b | two lines |"


def test_profile_counts_actmem_kernels_by_name():
    def event(name, us, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event("_quantize_kernel", 30), event("_quantize_kernel", 10), event("sm90_gemm", 50),
              event("Memcpy DtoD", 5), event("_split_compress_kernel", 20), event("aten::mul", 999, DeviceType.CPU)]
    total, ours = profile.device_times(events, {"_quantize_kernel", "_split_compress_kernel", "_unused_kernel"})
    assert total == 115
    assert ours == {"_quantize_kernel": (40, 2), "_split_compress_kernel": (20, 1)}
