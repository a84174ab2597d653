"""The GPU suite: every GPU figure actmem reports, from one command (`python scripts/gpu_suite.py`).

GPU time comes in short windows, so one run captures everything, each section in its own process
with its own time limit, each writing its file as soon as it ends. A section is a registered unit
(base.register: name, time limit, fn(ctx) -> markdown); runner.SECTION_MODULES lists the modules
that register them, in order of importance. Nothing here is imported before the runner has set up
the environment (`--dry-run` must set TRITON_INTERPRET before any Triton kernel is defined).
"""
