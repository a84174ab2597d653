"""Errors a user can fix. The entry points print them as one paragraph, without a traceback."""


class ActmemError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(ActmemError):
    """An impossible or unknown setting, caught before training starts."""


class DataNotFoundError(ActmemError):
    """A dataset is not where the config says; the message says how to get it."""


class StrategyError(ConfigError):
    """A strategy cannot serve this model (or this combination of strategies)."""


class NonFiniteError(ActmemError, ValueError):
    """A tensor to compress holds NaN or Inf: it has no code, and training has usually diverged."""


class DivergedError(ActmemError):
    """Training produced a NaN or Inf (loss, gradients or an activation to compress) at `step`."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
