"""Reading a small text file a user names (a recipe, a model config): every failure is one line.

The caller says what the file is and which :class:`~compress.errors.DqrmError` subclass stands for
its mistakes, so a missing, unreadable, non-UTF-8 file or a directory reads the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

from compress.errors import DqrmError


def read_user_text(path: Path, kind: str, error: type[DqrmError], *, file_kind: str = "") -> str:
    """The UTF-8 text of ``path``; ``error`` naming the path on any failure (``kind`` in "no such
    <kind>", ``file_kind`` (default ``kind``) in "is a directory, not a <file_kind>")."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise error(f"{path}: no such {kind}") from e
    except IsADirectoryError as e:
        raise error(f"{path}: is a directory, not a {file_kind or kind}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from e
