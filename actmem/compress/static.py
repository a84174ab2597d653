"""Compile a recorded kernel specialization for a GPU that is not here, and read what it costs.

`triton.compile` builds PTX and a cubin for any CUDA target without a GPU; the ptxas bundled with
Triton reports, with -v, the registers per thread and the bytes spilled. From those, the warps and
the shared memory, `occupancy` gives the theoretical occupancy by CUDA's occupancy rules. Nothing
here runs a kernel.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
from dataclasses import dataclass

from actmem.compress.launch import Launch

# Per-SM limits of the targets we check (CUDA C Programming Guide, "Compute capabilities" table):
# registers, warps, blocks, shared memory per SM (bytes), and the datasheet DRAM bandwidth (GB/s)
# of the card the target stands for.
TARGETS = {
    80: dict(card="A100 SXM4 80GB", regs=65536, warps=64, blocks=32, smem=167936, bandwidth=2039),
    90: dict(card="H100 SXM5", regs=65536, warps=64, blocks=32, smem=233472, bandwidth=3350),
}
REG_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED = 1024  # shared memory the driver reserves per block (sm_80 and up)


@dataclass
class Compiled:
    launch: Launch
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int  # bytes of shared memory per block (Triton's dynamic allocation)
    warps: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def occupancy(self) -> float:
        return occupancy(self.arch, self.registers, self.warps, self.shared)


def occupancy(arch: int, registers: int, warps: int, shared: int) -> float:
    """Theoretical occupancy: resident warps per SM over the SM's maximum, limited by registers,
    warps, blocks and shared memory, whichever binds first."""
    sm = TARGETS[arch]
    per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    blocks = min(sm["blocks"], sm["warps"] // warps, sm["regs"] // per_warp // warps)
    if shared:
        blocks = min(blocks, sm["smem"] // (shared + SMEM_RESERVED))
    return blocks * warps / sm["warps"]


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile `launch` for sm_<arch> as Triton's JIT would on that GPU; raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel = getattr(importlib.import_module(launch.module), launch.kernel)
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError(f"{launch.kernel} is not a compilable kernel ({type(kernel).__name__}): "
                           "the compile check must run without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options(dict(launch.options))
    index = {name: (kernel.arg_names.index(name),) for name, _ in launch.signature}
    source = ASTSource(kernel, dict(launch.signature), {index[k]: v for k, v in launch.constexprs},
                       {index[k]: [list(a) for a in v] for k, v in launch.attrs})
    log = io.StringIO()
    with _ptxas_log(), contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=target, options=options.__dict__)
    text = log.getvalue()
    registers = _field(text, r"Used (\d+) registers", launch)
    stores = _field(text, r"(\d+) bytes spill stores", launch)
    loads = _field(text, r"(\d+) bytes spill loads", launch)
    return Compiled(launch, arch, registers, stores, loads, compiled.metadata.shared, compiled.metadata.num_warps)


@contextlib.contextmanager
def _ptxas_log():
    """Compile afresh (no cache hit, which would skip ptxas) and have Triton print ptxas -v's report."""
    saved = {k: os.environ.get(k) for k in ("TRITON_ALWAYS_COMPILE", "TRITON_DUMP_PTXAS_LOG")}
    os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _field(log: str, pattern: str, launch: Launch) -> int:
    found = re.search(pattern, log)
    if found is None:
        raise RuntimeError(f"ptxas -v printed no '{pattern}' for {launch.name}; has Triton's ptxas log moved? "
                           f"It printed:\n{log}")
    return int(found.group(1))
