"""The GPU-only tests (tests/gpu, marker `gpu`): every compress kernel against the torch reference on
CUDA tensors, the forward-AD kernel against torch.func.jvp, and every strategy's forward against
exact's. Runs `pytest -m gpu` and records the counts, the failing tests and, on failure, the end of
pytest's report. A dry run only checks that the tests collect (they skip without CUDA)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections import Counter

from actmem.experiments.gpu_suite.base import Context, Table, register
from actmem.experiments.gpu_suite.record import REPO

OUTCOME = re.compile(r"^(\S+::.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")  # pytest -v, one per test
SHOWN = 30  # failing tests listed by name


def pytest_cmd(*args: str) -> list[str]:
    if importlib.util.find_spec("pytest") is None:
        raise RuntimeError(f"pytest is not installed for {sys.executable}, so the GPU tests cannot run; install "
                           "pytest there (pip install pytest) and run --only correctness again.")
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", *args, "tests/gpu"]


def collect_only(ctx: Context) -> str:
    res = subprocess.run(pytest_cmd("--collect-only", "-q"), cwd=REPO, capture_output=True, text=True,
                         timeout=max(ctx.left(), 1))
    collected = sum("::" in line for line in res.stdout.splitlines())
    if res.returncode != 0 or collected == 0:
        raise RuntimeError(f"tests/gpu did not collect (exit {res.returncode}, {collected} tests):\n"
                           f"{res.stdout[-3000:]}{res.stderr[-3000:]}")
    table = Table("check", "result")
    table.add("`pytest -m gpu --collect-only tests/gpu`", f"{collected} tests collected; not run (no GPU)")
    return str(table)


@register("correctness", limit=150)
def correctness(ctx: Context) -> str:
    if ctx.dry_run:
        return collect_only(ctx)
    cmd = pytest_cmd("-v", "-rfE")
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(ctx.left(), 1))
        output, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:  # keep what ran
        output, rc = _text(e.stdout) + _text(e.stderr), None
    outcomes = [m.groups() for m in map(OUTCOME.match, output.splitlines()) if m]
    counts = Counter(outcome for _, outcome in outcomes)
    table = Table("tests", *sorted(counts), "pytest exit")
    table.add(len(outcomes), *(counts[k] for k in sorted(counts)),
              "stopped at the section's time limit" if rc is None else rc)
    parts = [f"`{' '.join(['pytest', *cmd[3:]])}`", "", str(table)]
    failed = [test for test, outcome in outcomes if outcome in ("FAILED", "ERROR")]
    if failed:
        parts += ["", f"Failed ({len(failed)}):", ""] + [f"- `{t}`" for t in failed[:SHOWN]]
        parts += [f"- ... and {len(failed) - SHOWN} more"] if len(failed) > SHOWN else []
    if rc != 0:
        tail = "\n".join(output.splitlines()[-150:])
        parts += ["", "The end of pytest's output:", "", "```", tail, "```"]
    return "\n".join(parts)


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""
