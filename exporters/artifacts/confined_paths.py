"""Paths a manifest may name, and the one way a reader turns them into files (confinement).

Every file of an artifact directory is named in its manifest by a path relative to the directory.
:func:`path_problem` says, without the disk, why a string cannot be such a path (absolute, a
``..`` component, not in normal form, NUL or backslash characters, the manifest itself);
:func:`confined_path` also resolves it and refuses one that leaves the directory through a
symbolic link. Every file access from a manifest goes through :func:`confined_path`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from compress.errors import ArtifactError
from exporters.artifacts.json_fields import Kind, show
from exporters.artifacts.manifest_schema import MANIFEST


def path_problem(rel: object) -> str | None:
    """Why ``rel`` cannot name a file of an artifact directory, or ``None`` when it can: it must
    be a non-empty relative POSIX path in normal form with no ``..`` (checked without the disk)."""
    if not isinstance(rel, str) or not rel:
        return f"expected a relative path, got {show(rel)}"
    if "\x00" in rel or "\\" in rel:
        return f"{rel!r}: a path may not hold NUL or backslash characters"
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        return f"{rel!r}: absolute path refused (paths are relative to the artifact directory)"
    if ".." in pure.parts:
        return f"{rel!r}: '..' refused (paths must stay inside the artifact directory)"
    if pure.as_posix() != rel or "." in rel.split("/"):
        return f"{rel!r}: not in normal form (write it as {pure.as_posix()!r})"
    if rel == MANIFEST:
        return f"{rel!r}: the manifest cannot list itself"
    return None


#: A manifest value that names a file: a string :func:`path_problem` accepts (a non-empty string
#: it refuses is reported with its reason).
PATH = Kind(
    "a relative path",
    lambda v: path_problem(v) is None,
    explain=lambda v: path_problem(v) if isinstance(v, str) and v else None,
)


def confined_path(root: str | Path, rel: object, where: str | Path | None = None) -> Path:
    """``root / rel`` when ``rel`` is a relative path in normal form (:func:`path_problem`) that
    resolves inside ``root`` (following symbolic links); :class:`ArtifactError` naming ``where``
    (default: the manifest) otherwise. Every file access from a manifest goes through here."""
    root = Path(root)
    label = where if where is not None else root / MANIFEST
    problem = path_problem(rel)
    if problem is not None:
        raise ArtifactError(f"{label}: {problem}")
    path = root / str(rel)
    try:
        resolved = path.resolve()
        inside = resolved.is_relative_to(root.resolve())
    except (OSError, RuntimeError) as e:  # RuntimeError: a symbolic link loop
        raise ArtifactError(f"{path}: cannot resolve ({e})") from None
    if not inside:
        raise ArtifactError(
            f"{path}: leaves the artifact directory through a symbolic link (to {resolved}), "
            "refused"
        )
    return path
