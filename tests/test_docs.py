"""The repository stands on its own: every file path it cites (in code, configs, docs and results) is in
it, every link in its markdown leads somewhere, the README stays a front door (short), and the contracts
in docs/ name what the registries hold."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import REPO

from actmem import models, strategies

TOP = ("actmem", "configs", "docs", "results", "scripts", "tests")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP)})/[\w./-]*\w)(?![\w<*{{-])")  # not patterns like a/<b>
CAPS_MD = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]+\.md)\b")  # README.md, or a bare name of a file elsewhere


def tracked_text_files():
    """The repository's text files: tracked ones, and new ones git does not ignore (not yet committed)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
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


README_MAX_LINES = 220
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title")


def markdown_pages():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (not of `#` comments inside its code blocks)."""
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        in_code ^= line.lstrip().startswith("```")
        if not in_code and re.match(r"#{1,6} ", line):
            found.add(slug(line.lstrip("#")))
    return found


def test_readme_is_a_front_door():
    """Everything past what a newcomer needs first lives in docs/, linked from the README."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_relative_link_in_the_markdown_leads_to_a_file():
    broken = []
    for page in markdown_pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)} links to {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, "\n".join(broken)
