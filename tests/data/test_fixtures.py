"""The real-dataset fixtures: one definition for the whole suite, and a missing dataset fails the tests that
need it, naming `make data` (CI runs `make data` before the tests: a skip there would hide a broken setup)."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO

TESTS = REPO / "tests"
DATA_FIXTURES = ("cifar10_root", "imagenette_root")


def _fixtures(path) -> set[str]:
    """Names of the functions that `path` decorates with pytest.fixture (bare or called)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                if ast.unparse(target) in ("pytest.fixture", "fixture"):
                    names.add(node.name)
    return names


def test_each_data_fixture_is_defined_once_for_the_whole_suite():
    conftests = sorted(TESTS.rglob("conftest.py"))
    assert TESTS / "conftest.py" in conftests and TESTS / "data" / "conftest.py" in conftests
    where = {name: [str(p.relative_to(TESTS)) for p in conftests if name in _fixtures(p)] for name in DATA_FIXTURES}
    assert where == {name: ["conftest.py"] for name in DATA_FIXTURES}, where
    assert "stopped_job" in _fixtures(TESTS / "data" / "conftest.py")  # what tests/data/conftest.py keeps


def test_a_missing_dataset_fails_a_data_test_naming_make_data(tmp_path):
    """The suite's conftests in a copy of the tests folder with no data/ beside it and no shared tarballs:
    a test in tests/data that asks for each dataset errors (not skips) with the fix in its message."""
    tests = tmp_path / "tests"
    (tests / "data").mkdir(parents=True)
    for rel in ("conftest.py", "helpers.py", "data/conftest.py"):
        shutil.copy(TESTS / rel, tests / rel)
    (tests / "data" / "test_probe.py").write_text(
        "def test_cifar10(cifar10_root):\n    pass\n\n\ndef test_imagenette(imagenette_root):\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --import-mode=importlib -p no:cacheprovider\n"
                                         "pythonpath = tests\n")
    no_shared = tmp_path / "no-shared-data"
    no_shared.mkdir()
    probe = str(Path("tests", "data", "test_probe.py"))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", probe], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ACTMEM_SHARED_DATA": str(no_shared)})
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "2 errors" in out and "skipped" not in out, out
    for folder, tarball in (("cifar10", "cifar10-jpg.tar.gz"), ("imagenette", "imagenette-160.tar.gz")):
        assert f"The {folder} dataset is missing: {tmp_path / 'data' / folder} does not exist" in out, out
        assert f"there is no {no_shared / tarball} to unpack. Run `make data`" in out, out
