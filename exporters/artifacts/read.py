"""Read an artifact directory back: the manifest, then memory-mapped arrays.

The runtime side of :mod:`exporters.artifacts.write`. Nothing here trusts the directory:

* :func:`load_manifest` reads ``manifest.json`` through
  :func:`~exporters.artifacts.manifest_integrity.read_manifest_bytes`: a format this tool reads,
  its digest and byte form first, then the typed schema (every malformed entry named by its JSON
  path).
* :func:`load_artifacts` runs the checks of :mod:`exporters.artifacts.directory_checks`
  (``verify=True``, the default, includes the checksums of every file) and raises
  :class:`~compress.errors.ArtifactError` with the first problem, then maps every array with
  ``np.load(mmap_mode="r", allow_pickle=False)``: opening a multi-GB directory reads only headers,
  and pages are read when rows are used. Every file is opened through
  :func:`~exporters.artifacts.confined_paths.confined_path`. The full report, every problem one
  line each, is ``verify``'s (:mod:`exporters.artifacts.verify`).

Callers that hand the arrays to ONNX Runtime or FBGEMM must load with ``verify=True``: a flipped
byte in a packed table is caught here, not as a crash inside a kernel.

Example::

    arts = load_artifacts("out/dlrm.int4_qat")
    arts.tables["t_cat_0"].arrays["data"]      # numpy.memmap uint8 [R, D*bits/8]
    arts.spec.feature_names                     # the model's sparse features, in order
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ArtifactError
from compress.io.model_spec import DLRMSpec
from compress.methods.handler import SHARED_ROLE
from exporters.artifacts.confined_paths import confined_path
from exporters.artifacts.directory_checks import directory_problems
from exporters.artifacts.manifest_integrity import read_manifest_bytes
from exporters.artifacts.manifest_parse import parse_manifest
from exporters.artifacts.manifest_schema import MANIFEST, Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableArrays:
    """One stored table: its manifest entry and its arrays by role (``data``, ``scale``, ...).

    A table of a parameter-sharing group holds the group's arrays as ``shared.data`` (and
    ``shared.scale``), and the group's manifest entry as ``entry["shared"]``.
    """

    name: str
    layout: str
    num_embeddings: int
    embedding_dim: int
    bits: int | None
    feature_names: tuple[str, ...]
    arrays: Mapping[str, np.ndarray]
    entry: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Artifacts:
    """A loaded artifact directory (arrays memory-mapped, read-only). ``manifest`` is the JSON
    object, ``parsed`` the checked :class:`~exporters.artifacts.manifest_schema.Manifest` it was
    read as."""

    path: Path
    manifest: dict
    spec: DLRMSpec
    tables: dict[str, TableArrays]  # in the model's table order
    dense: dict[str, np.ndarray]  # state-dict key -> array as stored
    dense_entries: dict[str, dict]  # state-dict key -> manifest entry
    parsed: Manifest

    @property
    def onnx(self) -> dict | None:
        """The manifest's ``onnx`` section (``None`` for directories exported without graphs)."""
        return self.manifest.get("onnx")

    def file(self, rel: str) -> Path:
        """The path of the directory's file ``rel``, refused when it would leave the directory."""
        return confined_path(self.path, rel)


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ManifestRead:
    """A checked manifest and the warnings reading it gave (a format 1 manifest has no digest)."""

    manifest: Manifest
    warnings: tuple[str, ...] = ()


def load_manifest(path: str | Path) -> ManifestRead:
    """``manifest.json`` of the directory ``path``: format and version, digest and byte form, then
    the typed schema; :class:`ArtifactError` (a :class:`ManifestError` listing every schema
    problem) when any of them fails."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: missing (not an artifact directory)")
    if mpath.is_symlink():
        raise ArtifactError(f"{mpath}: a symbolic link, refused (the manifest must be a file)")
    try:
        data = mpath.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{mpath}: unreadable ({e})") from None
    manifest, warnings = read_manifest_bytes(data, mpath)
    return ManifestRead(manifest, tuple(warnings))


def read_manifest(path: str | Path) -> dict:
    """The JSON object of the directory's ``manifest.json``, fully checked (:func:`load_manifest`)."""
    return dict(load_manifest(path).manifest.raw)


def spec_from_manifest(manifest: Mapping[str, Any] | Manifest) -> DLRMSpec:
    """The :class:`DLRMSpec` recorded in the manifest's ``model`` section."""
    if isinstance(manifest, Manifest):
        return manifest.spec
    return parse_manifest(manifest, MANIFEST, complete=False).spec


# ---------------------------------------------------------------------------------------------
# Loading


def load_artifacts(path: str | Path, verify: bool = True) -> Artifacts:
    """Open the artifact directory ``path``: checks (see the module docstring), then maps arrays.

    Raises :class:`ArtifactError` with the first problem (and how many more there are).
    ``verify=False`` skips the sha256 of every file but still checks the manifest, sizes and array
    headers. A format 1 manifest is read with a logged warning (it has no digest of itself).
    """
    root = Path(path)
    read = load_manifest(root)
    for warning in read.warnings:
        log.warning("%s", warning)
    raise_first(directory_problems(root, read.manifest, checksums=verify))
    return artifacts_from_manifest(root, read.manifest)


def raise_first(problems: list[str]) -> None:
    """Raise :class:`ArtifactError` with the first of ``problems``, if any."""
    if problems:
        n = len(problems) - 1
        more = f" (and {n} more problem{'s' if n > 1 else ''})" if n else ""
        raise ArtifactError(problems[0] + more)


def artifacts_from_manifest(root: str | Path, manifest: Manifest | dict) -> Artifacts:
    """Map the arrays of a directory whose manifest is ``manifest`` (a checked :class:`Manifest`,
    or a JSON object, parsed here as an unfinished one: ``manifest.json`` itself need not exist
    yet, as in :func:`exporters.artifacts.write.save`'s staging directory)."""
    root = Path(root)
    if not isinstance(manifest, Manifest):
        manifest = parse_manifest(manifest, root / MANIFEST, complete=False)
    groups = {g.name: g for g in manifest.shared_arrays}
    group_arrays = {
        g.name: {
            SHARED_ROLE + role: map_npy(confined_path(root, rel)) for role, rel in g.files.items()
        }
        for g in manifest.shared_arrays
    }
    tables: dict[str, TableArrays] = {}
    for t in manifest.tables:
        arrays = {role: map_npy(confined_path(root, rel)) for role, rel in t.files.items()}
        entry = dict(t.raw)
        if t.group is not None:
            arrays.update(group_arrays[t.group])
            entry["shared"] = dict(groups[t.group].raw)
        shape = (t.name, t.layout, t.num_embeddings, t.embedding_dim, t.bits, t.feature_names)
        tables[t.name] = TableArrays(*shape, arrays=arrays, entry=entry)
    tables = {t.name: tables[t.name] for t in manifest.spec.tables}
    dense = {d.key: map_npy(confined_path(root, d.file)) for d in manifest.dense}
    entries = {d.key: dict(d.raw) for d in manifest.dense}
    return Artifacts(root, manifest.raw, manifest.spec, tables, dense, entries, manifest)


def map_npy(path: Path) -> np.ndarray:
    """``np.load(path, mmap_mode="r", allow_pickle=False)``; errors name the file."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{path}: not a readable .npy file ({e})") from None
