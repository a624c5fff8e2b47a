"""What an artifact directory holds against what its manifest says: files, arrays and graphs.

:func:`directory_problems` lists every problem, one line each, naming the file: every listed file
(a path that leaves the directory, a missing file, a size or sha256 that differs from the
manifest), a file in the directory the manifest does not list, an array whose dtype or shape is
not what the manifest says (read from the ``.npy`` header, no data loaded), a truncated ``.npy``,
a shared array's hot ids that are not strictly increasing rows of its group, and (with
checksums) an ONNX graph that does not match the manifest
(:mod:`exporters.artifacts.graph_checks`). :func:`~exporters.artifacts.read.load_artifacts`
raises the first of them; ``verify`` reports them all (:mod:`exporters.artifacts.verify`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from compress.errors import ArtifactError
from compress.io.fingerprint import sha256_file
from compress.methods import registry
from compress.methods.handler import ArraySpec
from exporters.artifacts.confined_paths import confined_path
from exporters.artifacts.graph_checks import onnx_graph_problems
from exporters.artifacts.manifest_schema import (
    MANIFEST,
    DenseEntry,
    FileEntry,
    Manifest,
    SharedGroupEntry,
    TableEntry,
)


def table_array_specs(entry: TableEntry) -> dict[str, ArraySpec]:
    """What a table's files hold, as its method stores them (by the entry's ``layout``)."""
    method = registry.get(entry.layout)
    return method.stored_arrays(entry.num_embeddings, entry.embedding_dim, entry.bits)


def shared_array_specs(group: SharedGroupEntry) -> dict[str, ArraySpec]:
    """What a shared array's files hold, as the method that shares arrays stores them."""
    return registry.sharing_method().group_arrays(group.dtype, group.cells, group.raw)


def dense_array_spec(entry: DenseEntry) -> ArraySpec:
    """What a ``dense`` entry's file holds: INT8 codes, packed INT4 codes, or a float tensor."""
    if entry.layout == "int8":
        return "int8", entry.shape
    if entry.layout == "int4_offset_packed":
        return "uint8", (entry.shape[0], math.ceil(entry.shape[1] / 2))
    return None, entry.shape


def directory_problems(root: Path, manifest: Manifest, checksums: bool) -> list[str]:
    """Every problem of the directory ``root`` against its checked ``manifest`` (module
    docstring); ``checksums=False`` skips hashing files and reading graphs."""
    problems: list[str] = []
    bad: set[str] = set()
    for rel, meta in manifest.files.items():
        try:
            problem = _file_problem(confined_path(root, rel), meta, checksums)
        except ArtifactError as e:
            problem = str(e)
        if problem:
            problems.append(problem)
            bad.add(rel)
    problems += unlisted_entries(root, manifest.files)
    for rel, expected in expected_arrays(manifest).items():
        if rel not in bad:
            problem = check_npy(root / rel, expected)
            if problem:
                problems.append(problem)
                bad.add(rel)
    problems += hot_ids_problems(root, manifest, bad)
    if checksums and manifest.onnx is not None:
        graphs = [g for g in manifest.onnx.graphs.values() if g.file not in bad]
        problems += onnx_graph_problems(root, manifest.spec, graphs)
    return problems


def _file_problem(p: Path, meta: FileEntry, checksums: bool) -> str | None:
    if p.is_symlink() and not p.exists():
        return f"{p}: a broken symbolic link"
    if not p.is_file():
        return f"{p}: missing" if not p.exists() else f"{p}: not a regular file"
    size = p.stat().st_size
    if size != meta.bytes:
        return f"{p}: {size} bytes, the manifest says {meta.bytes}"
    if checksums and sha256_file(p) != meta.sha256:
        return f"{p}: checksum mismatch (changed or corrupted after export)"
    return None


def unlisted_entries(root: Path, files: Mapping[str, FileEntry]) -> list[str]:
    """A line for every file of ``root`` (but the manifest) that ``files`` does not list, and for
    every symbolic link to a directory (nothing is read through one)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames.sort()
        for name in list(dirnames):
            if (here / name).is_symlink():
                out.append(f"{here / name}: a symbolic link to a directory, refused")
                dirnames.remove(name)
        for name in sorted(filenames):
            rel = (here / name).relative_to(root).as_posix()
            if rel != MANIFEST and rel not in files:
                out.append(f"{here / name}: not listed in the manifest (added after export?)")
    return out


def hot_ids_problems(root: Path, manifest: Manifest, bad: set[str]) -> list[str]:
    """The hot ids of each shared array that has them (``files["hot_ids"]``, its header already
    checked unless in ``bad``) that are not strictly increasing rows of its group: the graph's
    binary search reads them as stored (:mod:`compress.methods.robe.hot_graph`)."""
    from compress.methods.robe.hot_graph import hot_ids_problem

    problems = []
    for g in manifest.shared_arrays:
        rel = g.files.get("hot_ids")
        if rel is None or rel in bad:
            continue
        try:
            ids = np.load(root / rel, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            problems.append(f"{root / rel}: not a readable .npy file ({e})")
            continue
        total = sum(t.num_embeddings for t in manifest.tables if t.group == g.name)
        problem = hot_ids_problem(ids, total) if ids.size else None
        if problem:
            problems.append(f"{root / rel}: shared array {g.name!r}: {problem}")
    return problems


def expected_arrays(manifest: Manifest) -> dict[str, ArraySpec]:
    """``{file: (dtype, shape)}`` for every ``.npy`` the manifest uses."""
    out: dict[str, ArraySpec] = {}
    for t in manifest.tables:
        wanted = table_array_specs(t)
        out.update({rel: wanted[role] for role, rel in t.files.items()})
    for g in manifest.shared_arrays:
        wanted = shared_array_specs(g)
        out.update({rel: wanted[role] for role, rel in g.files.items()})
    for d in manifest.dense:
        out[d.file] = dense_array_spec(d)
    return out


def read_npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, data offset)`` from a ``.npy`` header; ``ValueError`` when it is not one."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return dtype, tuple(shape), f.tell()


def check_npy(path: Path, expected: ArraySpec) -> str | None:
    """One line describing what is wrong with the ``.npy`` at ``path``, or ``None``."""
    try:
        dtype, shape, offset = read_npy_header(path)
    except (ValueError, OSError, EOFError) as e:
        return f"{path}: not a readable .npy file ({e})"
    if dtype.hasobject:
        return f"{path}: holds Python objects (pickle), refused"
    want_dtype, want_shape = expected
    if want_dtype is None:
        if dtype.kind != "f":
            return f"{path}: dtype {dtype}, expected a float array"
    elif dtype != np.dtype(want_dtype):
        return f"{path}: dtype {dtype}, expected {want_dtype}"
    if shape != want_shape:
        return f"{path}: shape {list(shape)}, expected {list(want_shape)}"
    size = offset + math.prod(shape) * dtype.itemsize
    if path.stat().st_size != size:
        return f"{path}: {path.stat().st_size} bytes, its header needs {size} (truncated?)"
    return None
