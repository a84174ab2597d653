"""compress is the codec library and knows nothing of training (docs/contracts.md): it imports nothing of
actmem outside itself, and refuses bad arguments with its own ValueErrors (CompressError), never with
actmem's training-config errors."""
import ast
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (import time)

import pytest  # noqa: E402
import torch  # noqa: E402

from actmem import compress  # noqa: E402
from actmem.compress.errors import CompressError, NonFiniteError  # noqa: E402
from actmem.compress.grid import grid_quantize  # noqa: E402
from actmem.compress.index import bucketize_pack, lookup_mul, pack_index, pack_mask  # noqa: E402
from actmem.compress.packing import pack_codes  # noqa: E402
from actmem.compress.split import split_quantize  # noqa: E402
from actmem.core.errors import ActmemError  # noqa: E402

COMPRESS = Path(compress.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports included), relative ones resolved."""
    package = "actmem.compress"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base == "actmem":  # from actmem import x: the module is actmem.x
                found.update(f"actmem.{alias.name}" for alias in node.names)
            else:
                found.add(base)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)  # importlib.import_module("actmem....") with a literal name
    return found


def test_parser_sees_every_kind_of_import(tmp_path):
    """The import check below is only as good as its parser: it must see nested and relative imports."""
    probe = tmp_path / "probe.py"
    probe.write_text("import actmem.core.errors\nfrom actmem import strategies\n"
                     "def f():\n    from actmem.runtime import engine\n    from ..core import errors\n"
                     "    from . import quant\n    importlib.import_module('actmem.measure')\n")
    assert _imported_modules(probe) == {"actmem.core.errors", "actmem.strategies", "actmem.runtime", "actmem.core",
                                        "actmem.compress", "actmem.measure"}


def test_compress_imports_nothing_of_actmem_outside_itself():
    modules = sorted(COMPRESS.glob("*.py"))
    assert len(modules) > 10 and COMPRESS / "errors.py" in modules
    outside = {f"{p.name}: {m}" for p in modules for m in _imported_modules(p)
               if (m == "actmem" or m.startswith("actmem.")) and not m.startswith("actmem.compress")}
    assert not outside, f"actmem.compress must know nothing of training; it imports {sorted(outside)}"


def _backend(name):
    def run():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ACTMEM_BACKEND", name)
            compress.quantize(torch.randn(2, 8), 2)
    return run


x = torch.randn(2, 3, 4, 4)
REFUSALS = {  # a bad call of each public entry point -> words of its message (naming what it takes)
    "quantize bits": (lambda: compress.quantize(x, 3), "bits=3 is not a quantization width"),
    "quantize group_size": (lambda: compress.quantize(x, 2, group_size=12), "group_size=12"),
    "quantize dtype": (lambda: compress.quantize(torch.arange(8), 2), "float32, float16 or bfloat16"),
    "per-sample widths": (lambda: compress.quantize(x, torch.tensor([2, 9])), "1..8"),
    "pack_codes bits": (lambda: pack_codes(torch.zeros(8, dtype=torch.uint8), 9), "bits=9 cannot be packed"),
    "split_quantize block": (lambda: split_quantize(x, block=0), "block=0"),
    "split_quantize bits": (lambda: split_quantize(x, 8, 9), "bits=9"),
    "grid_quantize shape": (lambda: grid_quantize(torch.randn(5), torch.ones(1), torch.zeros(1), 4),
                            r"\[N, C, \.\.\.\]"),
    "grid_quantize bits": (lambda: grid_quantize(x, torch.ones(3), torch.zeros(3), 9), "bits=9"),
    "pack_mask dtype": (lambda: pack_mask(x), "bool tensor"),
    "pack_index range": (lambda: pack_index(torch.tensor([0, 16]), 4), "4 bits cannot hold"),
    "bucketize_pack borders": (lambda: bucketize_pack(x, torch.zeros(2), 2), "needs 3 sorted"),
    "lookup_mul levels": (lambda: lookup_mul(pack_mask(x > 0), torch.zeros(3), x), "need 2 levels"),
    "ACTMEM_BACKEND": (_backend("cuda"), "ACTMEM_BACKEND='cuda' is not a backend"),
}


@pytest.mark.parametrize("call, words", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_are_compress_errors_not_training_config_errors(call, words):
    with pytest.raises(CompressError, match=words) as refused:
        call()
    assert isinstance(refused.value, ValueError) and not isinstance(refused.value, ActmemError)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("codec", [lambda t: compress.quantize(t, 2), split_quantize])
def test_nan_input_is_a_non_finite_error(codec):
    t = torch.randn(2, 3, 8, 8)
    t[1, 2, 3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN") as refused:
        codec(t)
    assert isinstance(refused.value, CompressError) and not isinstance(refused.value, ActmemError)


def test_errors_are_exported():
    assert compress.CompressError is CompressError and compress.NonFiniteError is NonFiniteError
    assert issubclass(NonFiniteError, CompressError) and issubclass(CompressError, ValueError)
