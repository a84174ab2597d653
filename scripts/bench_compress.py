"""Throughput of actmem.compress group quantization: quantize+pack and unpack+dequantize, in GB/s.

    python scripts/bench_compress.py                          # CPU: 1..64 MB, the torch reference
    python scripts/bench_compress.py --max-mb 1024            # GPU: 1 MB..1 GB, Triton kernels
    TRITON_INTERPRET=1 ACTMEM_BACKEND=triton python scripts/bench_compress.py --max-mb 1   # slow!

GB/s counts bytes read + bytes written (10^9 bytes): the input and the packed result (codes and
metadata) for quantize+pack, the same the other way for unpack+dequantize. Each figure is the best of
--repeats timed runs after one warm-up. "x reference" is the ratio to the torch reference on the same
device (1 when the reference is what runs); on a GPU, "% of copy" is the ratio to a device-to-device
`Tensor.copy_` of the input measured in the same run (on a CPU that copy runs from cache up to tens of
MiB, so the column is left out). Inputs are [N, 64, 32, 32] activations (one
sample = 256 KiB of fp32), quantized per sample in groups of 256 with stochastic rounding.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

import torch

from actmem import compress
from actmem.compress.backend import use_triton
from actmem.core.provenance import command_line, device_name, header

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def best_time(fn, repeats: int, device: torch.device) -> float:
    """Best wall time of fn over `repeats` runs, after one warm-up run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def measure(x: torch.Tensor, bits: int, repeats: int) -> tuple[float, float]:
    """(quantize+pack, unpack+dequantize) throughput of x at `bits`, in GB/s."""
    p = compress.quantize(x, bits, seed=0)
    moved = x.numel() * x.element_size() + p.nbytes
    tq = best_time(lambda: compress.quantize(x, bits, seed=0), repeats, x.device)
    td = best_time(lambda: compress.dequantize(p), repeats, x.device)
    return moved / tq / 1e9, moved / td / 1e9


def copy_gbs(x: torch.Tensor, repeats: int) -> float:
    """Device-to-device copy of x into a preallocated tensor, in GB/s (read + write)."""
    dst = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / best_time(lambda: dst.copy_(x), repeats, x.device) / 1e9


def check_cost(x: torch.Tensor, repeats: int) -> str:
    """What quantize's NaN/Inf check costs (it reduces the per-group steps), next to a full
    `torch.isfinite(x).all()`."""
    ms = [1e3 * best_time(fn, repeats, x.device) for fn in (
        lambda: compress.quantize(x, 2, seed=0), lambda: compress.quantize(x, 2, seed=0, check=False),
        lambda: bool(torch.isfinite(x).all()))]
    mb = x.numel() * x.element_size() // 2**20
    return (f"NaN/Inf check, {mb} MiB at 2 bits: quantize takes {ms[0]:.2f} ms with it, {ms[1]:.2f} ms "
            f"with check=False; torch.isfinite(x).all() alone takes {ms[2]:.2f} ms.")


def agrees_with_reference(x: torch.Tensor, bits: int) -> bool:
    """Nearest rounding: the same codes, metadata and decoded values as the torch reference."""
    p = compress.quantize(x, bits, stochastic=False)
    r = on_reference(compress.quantize, x, bits, 256, False)
    same = torch.equal(p.codes, r.codes) and all(torch.equal(a, b) for a, b in zip(p.meta, r.meta))
    return same and torch.equal(compress.dequantize(r), on_reference(compress.dequantize, r))


def on_reference(fn, *args):
    saved = os.environ.get("ACTMEM_BACKEND")
    os.environ["ACTMEM_BACKEND"] = "reference"
    try:
        return fn(*args)
    finally:
        if saved is None:
            del os.environ["ACTMEM_BACKEND"]
        else:
            os.environ["ACTMEM_BACKEND"] = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-mb", type=int, default=None,
                    help="largest input in MiB (powers of two from --min-mb); default 64 on CPU, 1024 on GPU")
    ap.add_argument("--min-mb", type=int, default=1)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    max_mb = args.max_mb or (1024 if device.type == "cuda" else 64)
    dtype = DTYPES[args.dtype]
    sample_elems = 64 * 32 * 32
    sizes = [mb for mb in (2**i for i in range(11)) if args.min_mb <= mb <= max_mb]

    probe = torch.empty(1, device=device)
    backend = "triton" if use_triton(probe) else "reference"
    env = f"ACTMEM_BACKEND={os.environ['ACTMEM_BACKEND']} " if "ACTMEM_BACKEND" in os.environ else ""
    extra = {"load average": ", ".join(f"{v:.1f}" for v in os.getloadavg()), "backend": backend,
             "input": f"{args.dtype} [N, 64, 32, 32], group 256, per sample, stochastic rounding; "
                      f"GB/s = (bytes read + written) / best of {args.repeats} runs"}
    if backend != "reference":
        x = torch.randn(8, 64, 32, 32, device=device).to(dtype)
        same = all(agrees_with_reference(x, bits) for bits in args.bits)
        extra[f"{backend} agrees bit for bit with the reference (nearest rounding)"] = same
    print("# actmem.compress: group quantization throughput\n\n"
          + header(env + command_line(), device_name(device), dt.datetime.now(), extra) + "\n"
          "| size MiB | bits | quantize+pack GB/s | unpack+dequantize GB/s | x reference (q, d) | % of copy (q, d) |\n"
          "|---:|---:|---:|---:|---:|---:|", flush=True)
    headline = None
    for mb in sizes:
        x = torch.randn(mb * 2**20 // (sample_elems * dtype.itemsize), 64, 32, 32, device=device).to(dtype)
        copy = copy_gbs(x, args.repeats) if device.type == "cuda" else None
        for bits in args.bits:
            q, d = measure(x, bits, args.repeats)
            rq, rd = 1.0, 1.0
            if backend != "reference":
                ref_q, ref_d = on_reference(measure, x, bits, args.repeats)
                rq, rd = q / ref_q, d / ref_d
            row = (f"| {mb} | {bits} | {q:.3g} | {d:.3g} | {rq:.3g}, {rd:.3g} | "
                   + (f"{100 * q / copy:.0f}%, {100 * d / copy:.0f}% |" if copy else "– |"))
            print(row, flush=True)
            if mb == 64 and bits == 2 and dtype == torch.float32:
                headline = q
    if headline is not None:
        print(f"\n64 MiB float32, 2 bits: quantize+pack at {headline:.2f} GB/s on the {backend} path.")
    print(check_cost(x, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
