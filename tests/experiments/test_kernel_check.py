"""The compile check: every kernel specialization that training launches compiles for sm_80 and sm_90
with no register spill (no GPU needed). Runs `python -m actmem.experiments.kernel_check` in a subprocess, since this
test session interprets the kernels (conftest sets TRITON_INTERPRET=1) and interpreted kernels cannot
be compiled. Its list of specializations is printed (pytest -s, or the report on failure) and written
to results/kernels-static.md by `python -m actmem.experiments.kernel_check --out results/kernels-static.md`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO

from actmem.compress import launch, static


def _run_check(tmp_path, *args):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("ACTMEM_BACKEND", None)
    cmd = [sys.executable, "-m", "actmem.experiments.kernel_check", "--out", str(tmp_path / "report.md"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_every_recorded_specialization_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    done = _run_check(tmp_path)
    print(done.stdout)
    assert done.returncode == 0, f"compile check failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert "kernels no run launched: none" in done.stdout, "a kernel of actmem is launched by no strategy"
    report = (tmp_path / "report.md").read_text()
    for name in launch.kernel_names():  # every kernel has a row per target
        for arch in static.TARGETS:
            assert f"| {name} | sm_{arch} |" in report


RECORDING = """
import json
import torch
from actmem import compress
from actmem.compress.launch import recording
x = torch.randn(4, 3, 8, 8)
with recording() as launches:
    packed = compress.quantize(x, 2, stochastic=False)
    y = compress.dequantize(packed)
reference = compress.dequantize(compress.quantize(x, 2, stochastic=False))
assert torch.equal(y, reference), "recording changed the values"
print(json.dumps(sorted({launch.name for launch in launches})))
"""


def test_recording_sees_each_launch_not_runs_it_and_keeps_the_reference_values():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("ACTMEM_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", RECORDING], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(names) == 2, names  # quantize and dequantize; the reference's own unpacking is not a launch
    assert names[0].startswith("_group_dequantize_kernel[") and "BITS=2" in names[0] and "MIXED=False" in names[0]
    assert names[1].startswith("_group_quantize_kernel[") and "STOCHASTIC=False" in names[1]
    assert "(*fp32:16," in names[1]  # x's dtype, and its alignment as Triton specializes it


def test_a_spill_or_a_compile_error_fails_the_check_and_names_the_kernel():
    from actmem.experiments.kernel_check import problems

    spec = launch.Launch("m", "_k_kernel", (("x_ptr", "*fp32"), ("BITS", "constexpr")), (("BITS", 2),), (), ())
    spilled = static.Compiled(spec, 90, registers=255, spill_stores=8, spill_loads=4, shared=0, warps=4)
    clean = static.Compiled(spec, 80, registers=40, spill_stores=0, spill_loads=0, shared=0, warps=4)
    found = problems([spilled, clean, (spec, 80, "CompilationError: boom")])
    assert found == ["sm_90: _k_kernel[BITS=2](*fp32) spills 8 B stored / 4 B loaded (255 registers)",
                     "sm_80: _k_kernel[BITS=2](*fp32) failed to compile: CompilationError: boom"]


def test_occupancy_follows_cuda_rules():
    # 32 registers, 4 warps, no shared memory: warps bind (16 blocks of 4 warps = 64 warps).
    assert static.occupancy(90, 32, 4, 0) == 1.0
    # 168 registers: 5376 per warp -> 12 warps fit -> 3 blocks of 4 warps -> 12 / 64.
    assert static.occupancy(90, 168, 4, 0) == 12 / 64
    # 100 KiB of shared memory a block: 2 blocks on sm_90 (228 KiB), 1 on sm_80 (164 KiB).
    assert static.occupancy(90, 32, 4, 100 * 1024) == 8 / 64
    assert static.occupancy(80, 32, 4, 100 * 1024) == 4 / 64
