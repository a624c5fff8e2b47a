"""The few exception types that stand for user mistakes.

Every error a user can cause (a bad checkpoint, data file, recipe or artifact) is raised as a
subclass of :class:`DqrmError` with a one-line message that names the file, line, table or key at
fault. The CLI prints that line and exits with :attr:`DqrmError.exit_code`; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class DqrmError(Exception):
    """Base class: a user-facing error with a one-line message."""

    exit_code: int = 2


class CheckpointError(DqrmError):
    """A checkpoint that cannot be read, is unsafe, or is not a TorchRec DLRM."""


class ModelConfigError(DqrmError):
    """A model-config file that is malformed or disagrees with the checkpoint."""


class DataError(DqrmError):
    """A data file or directory that cannot be parsed."""


class RecipeError(DqrmError):
    """A recipe that is malformed or does not fit the model."""


class ArtifactError(DqrmError):
    """An exported artifact directory that is missing, corrupt or from a newer format."""
