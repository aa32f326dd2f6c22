"""The two ways a LoRA goes wrong: a file that is not a (supported, fitting) LoRA, and a LoRA that did not arrive
intact in a pipeline."""
from __future__ import annotations

from ..errors import StepdistillError


class LoraFormatError(StepdistillError, ValueError):
    """A file or state dict is not a (supported) LoRA, or does not fit the base model."""


class LoraLoadError(StepdistillError, RuntimeError):
    """A LoRA did not arrive intact in a pipeline; ``.report`` holds the
    :class:`~stepdistill.lora.verify.LoraLoadReport`."""

    def __init__(self, message: str, report):
        super().__init__(message)
        self.report = report
