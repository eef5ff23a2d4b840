"""Every failure a user can cause is a MergesmithError: one line of cause, one of hint.

The CLI prints these without a traceback; anything else is a bug in mergesmith.
"""

from __future__ import annotations


class MergesmithError(Exception):
    """A failure caused by the user's inputs or environment, explained in one line."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class RecipeError(MergesmithError):
    """The recipe is malformed: bad YAML, unknown field, bad value."""


class ModelNotFoundError(MergesmithError):
    """A model reference names no local folder and no cached hub snapshot."""


class CheckpointError(MergesmithError):
    """A checkpoint file is missing, truncated, corrupt or unsupported."""


class PlanError(MergesmithError):
    """The inputs cannot be merged as asked: shapes, names, vocabularies, layer ranges."""


class MethodError(MergesmithError):
    """A merge method was given inputs or parameters it cannot use."""


class OutputError(MergesmithError):
    """The output folder cannot be written, or a resume does not match."""


class TaskError(MergesmithError):
    """An evaluation task definition or its data is malformed: bad field, missing file or column."""


class CalibrationError(MergesmithError):
    """Calibration data or settings are unusable: missing or empty file, bad field or label, text
    longer than the model's context, a head that does not fit the model."""
