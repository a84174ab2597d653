"""What a section is and what it is given: the registry, the context a section runs with, and the
markdown table it returns."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

WRAP_UP_S = 5.0  # what a section keeps back from its deadline to write its table


@dataclass(frozen=True)
class Context:
    """What a section runs with, passed to its process as JSON."""

    dry_run: bool  # CPU, Triton interpreter, toy sizes
    deadline: float  # time.time() at which the runner kills the section
    progress_path: str  # where the section's markdown goes (see `progress`)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")

    def left(self) -> float:
        """Seconds the section may still spend measuring (its deadline less WRAP_UP_S)."""
        return self.deadline - time.time() - WRAP_UP_S

    def progress(self, markdown: str) -> None:
        """Save the section's markdown so far: if it is stopped at its limit, the runner keeps this."""
        tmp = f"{self.progress_path}.tmp"
        with open(tmp, "w") as f:
            f.write(markdown)
        os.replace(tmp, self.progress_path)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Context:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Section:
    name: str  # also the file: gpu-<name>.md
    limit: float  # seconds, its process's start included
    fn: Callable[[Context], str]  # a module-level function: the section's process imports it by name


SECTIONS: dict[str, Section] = {}


def register(name: str, limit: float):
    """Decorator: `@register("kernels", limit=60)` on `fn(ctx) -> markdown`."""

    def deco(fn):
        if name in SECTIONS:
            raise ValueError(f"section {name!r} registered twice")
        SECTIONS[name] = Section(name, limit, fn)
        return fn

    return deco


class Table:
    """A markdown table, built row by row."""

    def __init__(self, *columns: str):
        self.columns = columns
        self.rows: list[list[str]] = []

    def add(self, *cells) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(c).replace("|", "\\|").replace("\n", " ") for c in cells])

    def __str__(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows])


def num(value: float | None, spec: str = ".1f") -> str:
    """A number for a table cell, '-' where there is none (e.g. GPU memory on a CPU dry run)."""
    return "-" if value is None else format(value, spec)


def mib(nbytes: int | None) -> str:
    return num(None if nbytes is None else nbytes / 2**20)
