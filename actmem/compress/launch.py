"""The one place where actmem launches a Triton kernel.

Every kernel goes through `launch`, so this is also where the compile check (actmem.experiments.kernel_check)
learns which specializations real training uses: inside `recording()`, each launch is recorded as
Triton's JIT would specialize it for a CUDA target (signature, constexprs, divisibility attributes,
options) and not run, and the compress functions take their torch reference for the values
(backend.dispatch). So a whole training step runs on the CPU, with no GPU and no interpreter, while
every launch it would make on a GPU is seen with its real arguments.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from contextlib import contextmanager
from dataclasses import dataclass, field

_recording: list[Launch] | None = None


@dataclass(frozen=True)
class Launch:
    """One kernel specialization: what Triton compiles once and reuses for every launch like it."""

    module: str  # where the kernel is defined
    kernel: str  # its function name
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type or "constexpr")
    constexprs: tuple[tuple[str, object], ...]
    attrs: tuple[tuple[str, tuple], ...]  # (argument, specialization attributes, e.g. divisibility 16)
    options: tuple[tuple[str, object], ...]  # launch options given (num_warps, enable_fp_fusion, ...)
    traffic: tuple[int, int] = field(default=(0, 0), compare=False)  # (bytes of tensor args, elements)

    @property
    def name(self) -> str:
        """kernel[constexprs](argument types), ":16" marking an argument specialized as divisible by 16."""
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        aligned = {k for k, v in self.attrs if ("tt.divisibility", 16) in v}
        types = ",".join(t + ":16" * (k in aligned) for k, t in self.signature if t != "constexpr")
        return f"{self.kernel}[{consts}]({types})"


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs); inside `recording()`, only recorded."""
    if _recording is not None:
        _recording.append(_specialization(kernel, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextmanager
def recording():
    """Record, instead of running, every launch inside the block; yields the list of Launch records.
    Needs compiled (not interpreted) kernels: run it without TRITON_INTERPRET=1."""
    with _recording_into([]) as launches:
        yield launches


def not_recording():
    """Launches inside are neither recorded nor (as outside any recording) held back."""
    return _recording_into(None)


@contextmanager
def _recording_into(launches):
    global _recording
    outer, _recording = _recording, launches
    try:
        yield launches
    finally:
        _recording = outer


def record_only() -> bool:
    """True inside `recording()`: the compress functions then compute their results with the reference."""
    return _recording is not None


def _specialization(kernel, args, kwargs) -> Launch:
    """The launch as Triton's JIT specializes it (its own binder, for a CUDA target)."""
    backend, binder = _binder(kernel)
    bound, spec, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    names = kernel.arg_names
    tensors = {a.untyped_storage().data_ptr(): a for a in args if hasattr(a, "data_ptr")}.values()
    return Launch(
        module=kernel.fn.__module__, kernel=kernel.fn.__name__,
        signature=tuple(signature.items()),
        constexprs=tuple((names[k[0]], v) for k, v in constexprs.items()),
        attrs=tuple((names[k[0]], tuple(map(tuple, v))) for k, v in attrs.items() if v),
        options=tuple(sorted((k, v) for k, v in kwargs.items() if k not in names)),
        traffic=(sum(t.numel() * t.element_size() for t in tensors), max(t.numel() for t in tensors)))


@functools.cache
def _binder(kernel):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def kernels() -> dict[str, object]:
    """Every Triton kernel of actmem, by name: the @triton.jit functions named `*_kernel` in the
    kernel modules (`compress/triton_*`); the other jit functions are helpers that Triton inlines into
    them."""
    found = {}
    for info in pkgutil.iter_modules(importlib.import_module("actmem.compress").__path__):
        if not info.name.startswith("triton_"):
            continue
        module = importlib.import_module(f"actmem.compress.{info.name}")
        for name, obj in inspect.getmembers(module):
            if name.endswith("_kernel") and getattr(obj, "fn", None) and obj.fn.__module__ == module.__name__:
                if name in found:
                    raise RuntimeError(f"two kernels are named {name}: a profiler trace could not tell them apart")
                found[name] = obj
    return found


def kernel_names() -> set[str]:
    """The names actmem's kernels carry in a profiler trace."""
    return set(kernels())
