"""`python -m actmem.report PATH... [--format md|csv|latex] [--out FILE] [--plot FILE.png]`:
one row per run (every summary.json under the paths), beside the exact run of the same setting."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from actmem.runtime.rundir import owner_alive

MB = 2**20
COLUMNS = ["dataset", "model", "strategy", "bits", "batch", "world_size", "status", "epochs", "test_acc",
           "activation_MB", "activation_ratio", "step_peak_MB", "peak_memory_MB", "peak_rss_MB", "img_per_s",
           "throughput_vs_exact", "reason", "run"]


def _bits(strategy_config: dict | None) -> str | None:
    """The width ("2") or level ("L3") as text, so that a table mixing them (or a float budget) prints as given."""
    cfg = strategy_config or {}
    for key in ("bits", "level"):
        if cfg.get(key) is not None:
            return f"{cfg[key]:g}" if isinstance(cfg[key], (int, float)) else str(cfg[key])
    return None


def load_runs(paths) -> pd.DataFrame:
    """Every summary.json under `paths` (files or directories) as one row each."""
    rows = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob("summary.json"))
        for f in files:
            s = _summary(f)
            if s is None:
                continue
            mb = lambda v: v / MB if v is not None else None  # noqa: E731
            rows.append({
                "dataset": s.get("dataset"), "model": s.get("model"), "strategy": s.get("strategy"),
                "bits": _bits(s.get("strategy_config")), "batch": s.get("batch_size"),
                "world_size": s.get("world_size") or 1, "status": _status(s, f.parent),
                "epochs": s.get("epochs"), "test_acc": s.get("test_acc"),
                "activation_MB": mb(s.get("activation_bytes")), "activation_ratio": s.get("activation_ratio"),
                "step_peak_MB": mb(s.get("peak_tensor_bytes")), "peak_memory_MB": mb(s.get("peak_memory_bytes")),
                "peak_rss_MB": mb(s.get("peak_rss_bytes")),
                "img_per_s": s.get("throughput_img_s"),
                # why a run failed or was interrupted; none for a completed one
                "reason": s.get("error") if _status(s, f.parent) != "killed" else KILLED,
                "run": str(f.parent),
            })
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "throughput_vs_exact"])
    return add_relative_throughput(df)


KILLED = ("its process ended without a word (SIGKILL, the out-of-memory killer or a lost node); run the same "
          "command again to resume from its last checkpoint")


def _status(summary: dict, run_dir: Path) -> str | None:
    """summary.json's status, except that a run left "running" whose directory no live process owns
    (actmem.runtime.rundir's lock) was killed."""
    status = summary.get("status")
    if status == "running" and owner_alive(run_dir) is False:
        return "killed"
    return status


def _summary(f: Path) -> dict | None:
    """The summary's fields; None (and a line on stderr naming the file) where it is not a JSON object, so
    that one damaged run leaves the rest of a sweep's table."""
    try:
        s = json.loads(f.read_text())
        if isinstance(s, dict):
            return s
        reason = f"a JSON {type(s).__name__}, not an object"
    except (OSError, ValueError) as e:
        reason = f"unreadable: {e}"
    print(f"Skipped {f}: {reason}. Its run is not in the table; rerun it, or remove the file.", file=sys.stderr)
    return None


def plot_formats() -> set[str]:
    from matplotlib.figure import Figure

    return set(Figure().canvas.get_supported_filetypes())


def add_relative_throughput(df: pd.DataFrame) -> pd.DataFrame:
    """img/s over that of the exact run with the same dataset/model/batch and number of processes (the
    latest one, if several): a data-parallel run's img/s is the sum over its ranks."""
    key = ["dataset", "model", "batch", "world_size"]
    exact = df[(df.strategy == "exact") & (df.status == "completed")].drop_duplicates(key, keep="last")
    exact = exact[key + ["img_per_s"]].rename(columns={"img_per_s": "exact_img_per_s"})
    out = df.merge(exact, on=key, how="left")
    out["throughput_vs_exact"] = out.img_per_s / out.exact_img_per_s
    return out[COLUMNS]


def render(df: pd.DataFrame, fmt: str) -> str:
    shown = df.drop(columns=["run"])
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "latex":
        # escaped: model names hold "_", a failure's reason may hold "%" or "&"
        return shown.to_latex(index=False, float_format="%.2f", na_rep="--", escape=True)
    shown = shown.assign(reason=shown.reason.map(_md_cell))
    shown = shown.astype(object).where(shown.notna(), None)  # tabulate's missingval takes None, not NaN
    return shown.to_markdown(index=False, floatfmt=".2f", missingval="-",
                             disable_numparse=[shown.columns.get_loc("bits")])  # "2" stays "2", not 2.00


def _md_cell(text: str | None) -> str | None:
    """One line with its pipes escaped: a reason may span lines or hold "a|b", which would break the row."""
    return " ".join(text.split()).replace("|", "\\|") if isinstance(text, str) else text


def plot(df: pd.DataFrame, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = df[df.status == "completed"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (dataset, model), group in done.groupby(["dataset", "model"]):
        axes[0].scatter(group.activation_MB, group.test_acc, label=f"{dataset}/{model}")
        axes[1].scatter(group.activation_ratio, group.throughput_vs_exact, label=f"{dataset}/{model}")
        for _, r in group.iterrows():
            axes[0].annotate(r.strategy, (r.activation_MB, r.test_acc), fontsize=8)
            axes[1].annotate(r.strategy, (r.activation_ratio, r.throughput_vs_exact), fontsize=8)
    axes[0].set(xlabel="activation memory (MB, measured)", ylabel="test top-1 (%)", xscale="log")
    axes[1].set(xlabel="activation ratio (exact / strategy)", ylabel="throughput vs exact")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m actmem.report", description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="run directories, sweep directories or summary.json files")
    ap.add_argument("--format", choices=("md", "csv", "latex"), default="md")
    ap.add_argument("--out", type=Path, help="write the table here instead of printing it")
    ap.add_argument("--plot", type=Path, help="also save a plot (PNG)")
    args = ap.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"Error: no such path: {', '.join(missing)}.", file=sys.stderr)
        return 2
    if args.plot and args.plot.suffix.lstrip(".").lower() not in plot_formats():
        print(f"Error: --plot {args.plot}: matplotlib cannot write a {args.plot.suffix or 'suffix-less'} file; "
              f"use one of {', '.join('.' + f for f in sorted(plot_formats()))}.", file=sys.stderr)
        return 2
    df = load_runs(args.paths)
    if df.empty:
        print(f"Error: no summary.json under {', '.join(args.paths)}; run `python -m actmem.train` first.",
              file=sys.stderr)
        return 2
    text = render(df, args.format)
    try:
        if args.out:
            args.out.write_text(text + "\n")
        else:
            print(text)
        if args.plot:
            plot(df, args.plot)
    except OSError as e:
        print(f"Error: cannot write {e.filename}: {e.strerror}. Give a path in a writable directory.",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
