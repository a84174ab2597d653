"""python -m actmem.report on hand-written summaries."""
import io
import json
import re
import subprocess
import sys

import pandas as pd
import pytest
from helpers import REPO

from actmem.report import load_runs, main, render


def _summary(path, strategy, img_s, batch=128, status="completed", **kw):
    path.mkdir(parents=True)
    world_size = kw.pop("world_size", None)
    s = {"status": status, "dataset": "cifar10", "model": "resnet20", "strategy": strategy, "world_size": world_size,
         "strategy_config": {"name": strategy, **kw}, "batch_size": batch, "epochs": 1, "test_acc": 50.0,
         "activation_bytes": 2**20 * 10, "activation_ratio": 2.0, "peak_memory_bytes": None,
         "peak_rss_bytes": 2**30, "throughput_img_s": img_s}
    (path / "summary.json").write_text(json.dumps(s))


def test_relative_throughput_against_exact_of_same_setting(tmp_path):
    _summary(tmp_path / "a", "exact", 100.0)
    _summary(tmp_path / "b", "checkpoint", 75.0)
    _summary(tmp_path / "c", "checkpoint", 30.0, batch=256)  # no exact at batch 256
    _summary(tmp_path / "d", "actnn", 50.0, bits=2)
    df = load_runs([tmp_path]).set_index("run")
    assert df.loc[str(tmp_path / "b"), "throughput_vs_exact"] == pytest.approx(0.75)
    assert df.loc[str(tmp_path / "a"), "throughput_vs_exact"] == pytest.approx(1.0)
    assert df.loc[str(tmp_path / "c"), "throughput_vs_exact"] != df.loc[str(tmp_path / "c"), "throughput_vs_exact"]
    assert df.loc[str(tmp_path / "d"), "bits"] == "2"
    assert df.loc[str(tmp_path / "a"), "activation_MB"] == pytest.approx(10.0)


def test_runs_of_another_number_of_ranks_are_compared_with_their_own_exact_run(tmp_path):
    _summary(tmp_path / "exact1", "exact", 100.0)
    _summary(tmp_path / "actnn2", "actnn", 150.0, world_size=2)  # 2 ranks: img/s summed over them
    _summary(tmp_path / "exact2", "exact", 180.0, world_size=2)
    _summary(tmp_path / "actnn4", "actnn", 300.0, world_size=4)  # no exact with 4 ranks
    df = load_runs([tmp_path]).set_index("run")
    assert df.loc[str(tmp_path / "actnn2"), "throughput_vs_exact"] == pytest.approx(150 / 180)
    assert pd.isna(df.loc[str(tmp_path / "actnn4"), "throughput_vs_exact"])
    assert df.loc[str(tmp_path / "actnn2"), "world_size"] == 2 and df.loc[str(tmp_path / "exact1"), "world_size"] == 1
    assert "world_size" in render(df.reset_index(), "md")


def test_a_run_left_running_by_a_dead_process_reads_as_killed(tmp_path):
    _summary(tmp_path / "dead", "exact", None, status="running")
    (tmp_path / "dead" / "run.lock").write_text("pid 1 on elsewhere")  # nobody holds it
    _summary(tmp_path / "nolock", "exact", None, status="running")  # from before locks: nobody owns it either
    df = load_runs([tmp_path]).set_index("run")
    assert set(df.status) == {"killed"}
    assert "without a word" in df.loc[str(tmp_path / "dead"), "reason"]


def test_bits_column_prints_as_given_with_exact_rows(tmp_path):
    """A table of exact (no bits) and a 2-bit strategy prints "-" and "2", not "nan" and "2.00"."""
    _summary(tmp_path / "a", "exact", 100.0)
    _summary(tmp_path / "b", "division", 50.0, bits=2)
    _summary(tmp_path / "c", "actnn", 50.0, level="L3", bits=2.5)
    rows = {line.split("|")[3].strip(): line.split("|")[4].strip()
            for line in render(load_runs([tmp_path]), "md").splitlines()[2:]}
    assert rows == {"exact": "-", "division": "2", "actnn": "2.5"}


@pytest.mark.parametrize("fmt, marker", [("md", "| dataset"), ("csv", "dataset,model"), ("latex", "\\toprule")])
def test_formats_and_plot(tmp_path, fmt, marker):
    _summary(tmp_path / "runs" / "a", "exact", 100.0)
    out, png = tmp_path / "table.txt", tmp_path / "plot.png"
    assert main([str(tmp_path / "runs"), "--format", fmt, "--out", str(out), "--plot", str(png)]) == 0
    assert marker in out.read_text()
    assert png.stat().st_size > 1000


def test_a_failed_run_shows_its_reason_in_every_format(tmp_path):
    """summary.json's "error" is the reason column ("-" for a completed run), on one line in md and escaped in
    LaTeX; a failed run's missing figures print "-", not "nan"."""
    _summary(tmp_path / "ok", "exact", 100.0)
    _summary(tmp_path / "bad", "actnn", None, status="failed", bits=2)
    reason = "optim.lr=inf: must be positive (none|bf16),\n50% & more"
    s = json.loads((tmp_path / "bad" / "summary.json").read_text())
    (tmp_path / "bad" / "summary.json").write_text(json.dumps({**s, "error": reason}))
    runs = load_runs([tmp_path])
    assert runs.set_index("strategy").reason.fillna("-").to_dict() == {"exact": "-", "actnn": reason}
    header, _, *rows = render(runs, "md").splitlines()
    names = [c.strip() for c in header.split("|")[1:-1]]
    table = [dict(zip(names, (c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]))) for r in rows]
    by_strategy = {row["strategy"]: row for row in table}
    assert names[-1] == "reason" and len(rows) == 2 and by_strategy["exact"]["reason"] == "-"
    assert by_strategy["actnn"]["reason"] == "optim.lr=inf: must be positive (none\\|bf16), 50% & more"
    assert by_strategy["actnn"]["img_per_s"] == "-"
    assert reason in pd.read_csv(io.StringIO(render(runs, "csv"))).reason.tolist()
    latex = render(runs, "latex")
    assert "(none|bf16), 50\\% \\& more" in " ".join(latex.split()) and "test\\_acc" in latex


def test_cli_errors_on_empty_or_missing_paths(tmp_path):
    res = subprocess.run([sys.executable, "-m", "actmem.report", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "no summary.json" in res.stderr
    res = subprocess.run([sys.executable, "-m", "actmem.report", str(tmp_path / "nope")], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no such path" in res.stderr


def test_damaged_summaries_are_skipped_by_name_and_unwritable_outputs_refused(tmp_path, capsys):
    _summary(tmp_path / "good", "exact", 100.0)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "summary.json").write_text('{"status": "compl')
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "summary.json").write_text("[1, 2]")
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "exact" in out and f"Skipped {tmp_path / 'corrupt' / 'summary.json'}: unreadable" in err
    assert f"Skipped {tmp_path / 'list' / 'summary.json'}: a JSON list, not an object" in err
    assert main([str(tmp_path), "--out", str(tmp_path / "no" / "such" / "dir" / "t.md")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert main([str(tmp_path), "--plot", str(tmp_path / "p.xyz")]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and ".png" in err and not (tmp_path / "p.xyz").exists()
