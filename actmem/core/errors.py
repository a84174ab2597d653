"""Errors a user can fix. The entry points print them as one paragraph (`paragraph`), without a traceback."""
from __future__ import annotations

import textwrap


def paragraph(text: str) -> str:
    """`text` as one paragraph, wrapped at 100 columns: how every refusal and failure is printed."""
    return textwrap.fill(" ".join(str(text).split()), width=100, break_long_words=False, break_on_hyphens=False)


class ActmemError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(ActmemError):
    """An impossible or unknown setting, caught before training starts."""


class DataNotFoundError(ActmemError):
    """A dataset is not where the config says; the message says how to get it."""


class StrategyError(ConfigError):
    """A strategy cannot serve this model (or this combination of strategies)."""


class DivergedError(ActmemError):
    """Training produced a NaN or Inf (loss, gradients or an activation to compress) at `step`."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
