"""compress's own errors. It is the codec library and knows nothing of training (docs/contracts.md), so
it refuses with plain ValueErrors of its own, never with actmem's training-config errors.

A strategy checks its settings (`strategy.KEY`, as a ConfigError) before it calls compress, so a user
meets CompressError only by calling compress directly; the runner turns NonFiniteError (a NaN/Inf
activation) into the run's DivergedError.
"""
from __future__ import annotations


class CompressError(ValueError):
    """An argument compress cannot take (a width, group or block size, dtype, shape, backend): the
    message names it and what it takes."""


class NonFiniteError(CompressError):
    """A tensor to compress holds NaN or Inf: it has no code, and training has usually diverged."""
