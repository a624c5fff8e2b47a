"""``verify``: every problem and warning of an artifact directory, one line each.

:func:`inspect_artifacts` reads the manifest (:func:`~exporters.artifacts.read.load_manifest`:
format, digest and byte form, schema), then lists every problem naming the file: the manifest's,
a format 1 manifest unless allowed (nothing shows that it was not edited), then everything
:func:`~exporters.artifacts.directory_checks.directory_problems` finds (files, checksums, arrays,
ONNX graphs), and last a directory the runtime could not assemble into a model
(:func:`servable_problems`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compress.errors import ArtifactError
from exporters.artifacts.directory_checks import directory_problems
from exporters.artifacts.manifest_integrity import format_1_warning
from exporters.artifacts.manifest_schema import MANIFEST, Manifest, ManifestError
from exporters.artifacts.read import artifacts_from_manifest, load_manifest


@dataclass(frozen=True)
class Verification:
    """What :func:`inspect_artifacts` found: problem lines (none: intact), warnings, and the
    manifest when it could be read."""

    problems: list[str]
    warnings: list[str]
    manifest: Manifest | None

    @property
    def ok(self) -> bool:
        return not self.problems


def inspect_artifacts(
    path: str | Path, checksums: bool = True, allow_format_1: bool = False
) -> Verification:
    """Every problem and warning of the artifact directory ``path`` (see the module docstring).
    ``checksums=False`` skips hashing (structure, sizes and headers only). A format 1 manifest (no
    digest of itself: nothing shows that it was not edited) is a problem unless ``allow_format_1``,
    then a warning."""
    root = Path(path)
    try:
        read = load_manifest(root)
    except ManifestError as e:
        return Verification(e.problems, [], None)
    except ArtifactError as e:
        return Verification([str(e)], [], None)
    warnings = list(read.warnings)
    problems = []
    if read.manifest.format_version < 2 and not allow_format_1:
        problems.append(
            f"{format_1_warning(str(root / MANIFEST))}; verify refuses it unless told "
            "--allow-format-1 (allow_format_1=True)"
        )
        warnings = []
    problems += directory_problems(root, read.manifest, checksums)
    if not problems:
        problems = servable_problems(root, read.manifest)
    return Verification(problems, warnings, read.manifest)


def verify_artifacts(
    path: str | Path, checksums: bool = True, allow_format_1: bool = False
) -> list[str]:
    """Every problem of the artifact directory ``path``, one line each naming the file; ``[]``
    when intact. ``checksums=False`` skips hashing (structure, sizes and headers only); a format
    1 manifest is a problem unless ``allow_format_1``."""
    return inspect_artifacts(path, checksums, allow_format_1).problems


def servable_problems(root: Path, manifest: Manifest) -> list[str]:
    """``[problem]`` when the runtime cannot assemble the directory into a model (a dense weight
    the architecture needs is not stored, shapes that do not chain), else ``[]``."""
    from exporters.onnx.from_artifacts import graph_spec_from_artifacts

    try:
        graph_spec_from_artifacts(artifacts_from_manifest(root, manifest))
    except ArtifactError as e:
        return [str(e)]
    return []
