"""The package's shape (issue 23): entry points at the top, layers in subpackages, nothing importing an
entry point, and short functions."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "actmem"
ENTRY_POINTS = {"actmem.train", "actmem.report", "actmem.maxbatch", "actmem.torchrun"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_at_most_six_top_level_modules_beside_the_subpackages():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top
    assert {f"actmem.{p[:-3]}" for p in top} - {"actmem.__init__"} == ENTRY_POINTS


def test_nothing_imports_an_entry_point():
    offenders = {str(p.relative_to(REPO)): sorted(imported(p) & ENTRY_POINTS) for p in modules()
                 if f"actmem.{p.stem}" not in ENTRY_POINTS or p.parent != PACKAGE}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_function_outside_triton_kernels_is_over_60_lines():
    long = []
    for p in modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kernel = any("triton.jit" in ast.unparse(d) for d in node.decorator_list)
                if not kernel and node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long
