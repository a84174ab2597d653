"""The GPU suite's command line: run the chosen sections, each in its own process under a time limit
and all under one overall budget, write each section's file as soon as it ends, print a summary.

    python scripts/gpu_suite.py                            # every section, results/gpu-<section>.md
    python scripts/gpu_suite.py --only correctness,kernels --budget 300
    python scripts/gpu_suite.py --dry-run                  # CPU, Triton interpreter, toy sizes

Exit status 0 when every chosen section ran to its end ('not met' targets and failed GPU tests are
results, written in the files); 1 when a section crashed, hit its limit or found the budget spent.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from actmem.core.config import positive_seconds
from actmem.core.errors import ConfigError
from actmem.experiments.gpu_suite import record
from actmem.experiments.gpu_suite.base import SECTIONS, Context, Section

# section name -> the module that registers it, in order of importance
SECTION_MODULES = {"correctness": "correctness", "training": "training", "kernels": "kernels", "profile": "profile",
                   "maxbatch": "largest_batch", "parity": "accuracy"}
MIN_SECTION_S = 20.0  # a section given less than this is skipped: it could not even start up
NO_GPU = ("gpu_suite: there is no CUDA device here (torch.cuda.is_available() is False), and every section "
          "measures on the GPU. Run it where there is an NVIDIA GPU, or pass --dry-run to run every section "
          "at toy sizes on the CPU through the Triton interpreter: a check that the suite runs, not measurements.")


@dataclass(frozen=True)
class Outcome:
    section: str
    status: str  # "ok", "crashed (exit N)", "stopped at time limit", "skipped: ..."
    seconds: float
    path: Path


def load_sections() -> dict[str, Section]:
    """Import the section modules (they register themselves), after the environment is set up; their
    sections in the order of SECTION_MODULES."""
    modules = [f"actmem.experiments.gpu_suite.{module}" for module in SECTION_MODULES.values()]
    for module in modules:
        importlib.import_module(module)
    return {s.name: s for module in modules for s in SECTIONS.values() if s.fn.__module__ == module}


def select(sections: dict[str, Section], only: str | None) -> list[Section]:
    """The sections named in `only` (comma-separated), in the registry's order; all of them for None."""
    if only is None:
        return list(sections.values())
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in sections]
    if unknown or not wanted:
        raise ConfigError(f"--only {only!r}: unknown section {', '.join(map(repr, unknown)) or '(none named)'}; "
                          f"valid sections: {', '.join(sections)}.")
    return [s for name, s in sections.items() if name in wanted]


def run(sections: list[Section], out: Path, prov: record.Provenance, budget: float,
        dry_run: bool) -> list[Outcome]:
    """Each section in turn, given min(its limit, what is left of the budget)."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    outcomes = []
    for section in sections:
        left = budget - (time.monotonic() - start)
        if left < MIN_SECTION_S:
            status = f"skipped: {left:.0f} s of the {budget:.0f} s budget left"
            path = _write(out, section.name, prov, dt.datetime.now(dt.timezone.utc), 0.0, 0.0, f"**{status}**\n")
            outcomes.append(Outcome(section.name, status, 0.0, path))
            continue
        outcomes.append(run_section(section, min(section.limit, left), out, prov, dry_run))
    return outcomes


def run_section(section: Section, limit: float, out: Path, prov: record.Provenance,
                dry_run: bool) -> Outcome:
    """Run one section in a child process, killed at `limit` seconds; write its file."""
    body = out / f".gpu-{section.name}.partial.md"
    body.unlink(missing_ok=True)
    log = out / "logs" / f"gpu-{section.name}.log"
    log.parent.mkdir(exist_ok=True)
    ctx = Context(dry_run=dry_run, deadline=time.time() + limit, progress_path=str(body))
    cmd = [sys.executable, "-m", "actmem.experiments.gpu_suite.child", section.fn.__module__, section.fn.__qualname__,
           ctx.to_json()]
    print(f"[gpu_suite] {section.name}: running (limit {limit:.0f} s, log {log})", flush=True)
    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    with open(log, "w") as f:
        # Its own session, so that the kill takes its children too (correctness runs pytest).
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=record.REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also when the runner itself is interrupted: no section outlives it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - t0
    text = body.read_text() if body.exists() else ""
    if rc == 0:
        status = "ok"
    elif rc is None:
        status = "stopped at time limit"
        text += f"\n\n**stopped at time limit** ({limit:.0f} s): the rows above are what it measured before.\n"
    else:
        status = f"crashed (exit {rc})"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        text += f"\n\n**crashed** (exit {rc}); the end of its log ({log.name}):\n\n```\n{tail}\n```\n"
    path = _write(out, section.name, prov, started, seconds, limit, text)
    body.unlink(missing_ok=True)
    print(f"[gpu_suite] {section.name}: {status} in {seconds:.1f} s -> {path}", flush=True)
    return Outcome(section.name, status, seconds, path)


def _write(out: Path, name: str, prov, started, seconds: float, limit: float, text: str) -> Path:
    path = out / f"gpu-{name}.md"
    path.write_text(record.header(prov, name, started, seconds, limit) + "\n" + text.strip() + "\n")
    return path


def summary(outcomes: list[Outcome]) -> str:
    lines = ["| section | status | seconds | file |", "|---|---|---:|---|"]
    lines += [f"| {o.section} | {o.status} | {o.seconds:.1f} | {o.path} |" for o in outcomes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()  # the budget counts from here
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="gpu_suite.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help=f"comma-separated sections (default: all): {', '.join(SECTION_MODULES)}")
    ap.add_argument("--budget", type=float, default=480.0, help="overall time limit, seconds (default 480)")
    ap.add_argument("--out", type=Path, help="where the files go (default: results/, or a temp dir for --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="every section at toy sizes on the CPU through the Triton interpreter")
    args = ap.parse_args(argv)
    try:
        positive_seconds(args.budget, "--budget")
        if args.dry_run:  # before any Triton kernel is defined, here and in the sections' processes
            os.environ.update(TRITON_INTERPRET="1", ACTMEM_BACKEND="triton")
        chosen = select(load_sections(), args.only)
    except ConfigError as e:
        print(f"gpu_suite: {e}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="actmem-gpu-suite-")) if args.dry_run
                       else record.REPO / "results")
    prov = record.collect(shlex.join(["python", "scripts/gpu_suite.py", *argv]), args.dry_run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so the running section is killed too
    outcomes = run(chosen, out.resolve(), prov, args.budget - (time.monotonic() - t0), args.dry_run)
    print("\n" + summary(outcomes), flush=True)
    return 0 if all(o.status == "ok" for o in outcomes) else 1
