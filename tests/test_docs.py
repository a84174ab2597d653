"""The repository stands on its own: every file path it cites (in code, configs, docs and results) is in
it, and the contracts in docs/ name what the registries hold."""
from __future__ import annotations

import re
import subprocess

import pytest
from helpers import REPO

from actmem import models, strategies

TOP = ("actmem", "configs", "docs", "results", "scripts", "tests")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP)})/[\w./-]*\w)(?![\w<*{{-])")  # not patterns like a/<b>
CAPS_MD = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]+\.md)\b")  # README.md, or a bare name of a file elsewhere


def tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in out.splitlines():
        path = REPO / name
        if path.suffix in {".py", ".md", ".yaml", ".sh", ".toml", ".txt"} or path.name == "Makefile":
            yield path


def cited(text: str):
    for match in PATH.finditer(text):
        if "/." not in match.group(1):
            yield match.group(1)
    yield from CAPS_MD.findall(text)


def test_every_cited_path_is_in_the_repository():
    missing = []
    for file in tracked_text_files():
        for path in cited(file.read_text(errors="replace")):
            if not (REPO / path).exists() and not (REPO / path).with_suffix("").exists():
                missing.append(f"{file.relative_to(REPO)} cites {path}")
    assert not missing, "\n".join(sorted(set(missing)))


@pytest.mark.parametrize("names", [models.names(), strategies.STRATEGIES.names()])
def test_the_contracts_name_every_registered_option(names):
    text = (REPO / "docs" / "contracts.md").read_text()
    assert [n for n in names if f"`{n}`" not in text and f"{n}|" not in text and f"|{n}" not in text] == []
