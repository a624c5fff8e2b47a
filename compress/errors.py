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


class SettingError(DqrmError):
    """A setting given to a command or to the Python API (not in a file) that is out of range."""


class QualityGateError(DqrmError):
    """The compressed model lost more AUC than ``--max-auc-drop`` allows (exit code 3)."""

    exit_code = 3


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when it has none), at most 300
    characters: what a one-line message quotes of a library's exception."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def os_error_reason(error: OSError) -> str:
    """The operating system's reason for ``error`` in lower case, e.g. ``no space left on
    device``: what a one-line message about a file that cannot be written ends with."""
    reason = error.strerror or str(error) or type(error).__name__
    return reason[:1].lower() + reason[1:]


def os_error_in(error: BaseException) -> OSError | None:
    """``error`` itself when it is an ``OSError``, else the first ``OSError`` it was raised from or
    while handling (torch reports a failed write as a ``RuntimeError`` raised during the
    ``OSError``); ``None`` when no OS error is behind it."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
