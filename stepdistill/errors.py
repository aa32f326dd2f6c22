"""The errors a user can fix. Each message names the problem and the fix on one line; the command line prints
it as ``error: <problem>; <fix>`` without a traceback (exit code 2; ``--debug`` or ``STEPDISTILL_DEBUG=1`` shows
it). Everything else is a bug and keeps its traceback."""
from __future__ import annotations


class StepdistillError(Exception):
    """Base of the known, user-fixable errors."""


class ConfigError(StepdistillError, ValueError):
    """A recipe or override that cannot run: unknown key, wrong type, impossible combination."""


class DataError(StepdistillError, ValueError):
    """A training-data source that cannot be read as asked."""


class ModelError(StepdistillError, ValueError):
    """A model or pipeline that is not usable as asked (unsupported family, not a pipeline directory)."""


class CouplingError(StepdistillError, ValueError):
    """A couplings directory or teacher-ODE request that cannot be used as asked."""


class CouplingArgumentsMismatch(CouplingError):
    """``out_dir`` holds couplings generated with different arguments."""


class CheckpointError(StepdistillError, RuntimeError):
    """A checkpoint that cannot be resumed from: missing, incomplete, or from a run with another adapter shape."""


class TrainingDiverged(StepdistillError, RuntimeError):
    """The loss (or the adapter's weights) became non-finite; the run stopped without writing an adapter."""
