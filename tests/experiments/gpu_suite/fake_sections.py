"""Fixtures, not tests: sections for test_runner.py, which asserts on what they produce. The runner runs
a section in its own process, which imports the section's module by name: the tests put this folder on
PYTHONPATH."""
import time

from actmem.experiments.gpu_suite.base import Context, Table


def quick(ctx: Context) -> str:
    table = Table("a", "b")
    table.add(1, 2)
    return str(table)


def sleepy(ctx: Context) -> str:
    """Saves a first row, then overruns any limit."""
    table = Table("step")
    table.add("first")
    ctx.progress(str(table))
    time.sleep(600)
    return "never"


def broken(ctx: Context) -> str:
    raise RuntimeError("boom")
