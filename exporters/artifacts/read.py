"""Read an artifact directory back: the manifest, checksums, and memory-mapped arrays.

The runtime side of :mod:`exporters.artifacts.write`. Nothing here trusts the directory:

* :func:`load_manifest` reads ``manifest.json`` through :mod:`exporters.artifacts.manifest`: a format this
  tool reads, its digest and byte form first, then the typed schema (every malformed entry named by
  its JSON path).
* :func:`inspect_artifacts` / :func:`verify_artifacts` list every problem, one line each, naming the
  file: the manifest's, then every listed file (a path that leaves the directory, a missing file, a
  size or sha256 that differs from the manifest), a file in the directory the manifest does not
  list, an array whose dtype or shape is not what the manifest says (read from the ``.npy`` header,
  no data loaded), a truncated ``.npy``, an ONNX graph that reads external data the manifest does
  not list or declares other inputs/outputs than the manifest's model and features give it (ONNX
  Runtime takes both from the graph, so a manifest that swaps features is caught here), and last
  (``verify`` only) a directory the runtime could not assemble into a model.
* :func:`load_artifacts` runs those checks (``verify=True``, the default, includes the checksums
  of every file) and raises :class:`~compress.errors.ArtifactError` with the first problem, then maps
  every array with ``np.load(mmap_mode="r", allow_pickle=False)``: opening a multi-GB directory
  reads only headers, and pages are read when rows are used. Every file is opened through
  :func:`~exporters.artifacts.manifest.confined_path`.

Callers that hand the arrays to ONNX Runtime or FBGEMM must load with ``verify=True``: a flipped
byte in a packed table is caught here, not as a crash inside a kernel.

Example::

    arts = load_artifacts("out/dlrm.int4_qat")
    arts.tables["t_cat_0"].arrays["data"]      # numpy.memmap uint8 [R, D*bits/8]
    arts.spec.feature_names                     # the model's sparse features, in order
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from compress.errors import ArtifactError
from compress.io.model_spec import DLRMSpec
from compress.methods import registry
from compress.methods.base import SHARED_ROLE, ArraySpec
from exporters.artifacts.manifest import (
    MANIFEST,
    DenseEntry,
    FileEntry,
    Manifest,
    ManifestError,
    SharedGroupEntry,
    TableEntry,
    confined_path,
    format_1_warning,
    parse_manifest,
    read_manifest_bytes,
    sha256_file,
)

log = logging.getLogger(__name__)


def table_array_specs(entry: TableEntry) -> dict[str, ArraySpec]:
    """What a table's files hold, as its method stores them (by the entry's ``layout``)."""
    method = registry.get(entry.layout)
    return method.stored_arrays(entry.num_embeddings, entry.embedding_dim, entry.bits)


def shared_array_specs(group: SharedGroupEntry) -> dict[str, ArraySpec]:
    """What a shared array's files hold, as the method that shares arrays stores them."""
    return registry.sharing_method().group_arrays(group.dtype, group.cells)


def dense_array_spec(entry: DenseEntry) -> ArraySpec:
    """What a ``dense`` entry's file holds: INT8 codes, packed INT4 codes, or a float tensor."""
    if entry.layout == "int8":
        return "int8", entry.shape
    if entry.layout == "int4_offset_packed":
        return "uint8", (entry.shape[0], math.ceil(entry.shape[1] / 2))
    return None, entry.shape


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
    object, ``parsed`` the checked :class:`~exporters.artifacts.manifest.Manifest` it was read as."""

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
# Verification


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
    problems += _problems(root, read.manifest, checksums)
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


def _problems(root: Path, manifest: Manifest, checksums: bool) -> list[str]:
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


def onnx_graph_problems(root: Path, spec: DLRMSpec, graphs: list) -> list[str]:
    """A line for every graph of ``graphs`` (:class:`~exporters.artifacts.manifest.OnnxGraphEntry`)
    that is not a readable ONNX model, reads external data other than the file the manifest lists
    beside it, or declares inputs/outputs other than the model ``spec`` (the manifest's) gives it.
    ONNX Runtime takes data locations and input names from the graph itself, so both are held to
    the manifest. Only the graph is read (no external data)."""
    import onnx
    from google.protobuf.message import DecodeError

    out = []
    for graph in graphs:
        path = root / graph.file
        try:
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, OSError) as e:
            out.append(f"{path}: not a readable ONNX model ({e})")
            continue
        out += _external_data_problems(path, graph, model)
        out += declared_io_problems(path, graph, model.graph, spec)
    return out


def _external_data_problems(path: Path, graph, model) -> list[str]:
    folder = PurePosixPath(graph.file).parent
    allowed = (
        None
        if graph.external_data is None
        else PurePosixPath(graph.external_data).relative_to(folder).as_posix()
        if PurePosixPath(graph.external_data).is_relative_to(folder)
        else ""
    )
    out = []
    for location in sorted(_external_locations(model.graph)):
        if location != allowed:
            listed = repr(graph.external_data) if graph.external_data else "none"
            out.append(
                f"{path}: reads external data from {location!r}; the manifest lists {listed}"
            )
    return out


def declared_io_problems(path: Path, graph, onnx_graph, spec: DLRMSpec) -> list[str]:
    """``[problem]`` when the ONNX graph's declared inputs or outputs (names in order, element
    types, fixed dims) are not what the model ``spec`` gives the manifest graph ``graph``
    (:data:`exporters.onnx.model.GRAPH_IO`), or the manifest maps a feature of the full model to
    other input names than its own; else ``[]``."""
    from exporters.onnx.model import GRAPH_IO, GraphShape, feature_input_names

    io_of = GRAPH_IO.get(graph.name)
    if io_of is None:
        return [f"{path}: graph {graph.name!r} is not one dqrm-compress writes"]
    shape = GraphShape(spec.feature_names, spec.dense_in_features, spec.embedding_dim)
    try:
        want_inputs, want_outputs = io_of(shape)
        names = feature_input_names(shape) if graph.name == "model" else {}
    except ValueError as e:  # two features whose input names coincide
        return [f"{path}: the manifest's features give no valid inputs ({e})"]
    for f, pair in graph.features.items():
        if names.get(f) != pair:
            return [
                f"{path}: the manifest feeds feature {f!r} to inputs {list(pair)}, its graph "
                f"{graph.name!r} takes it as {list(names.get(f, ()))}"
            ]
    for kind, want, have in (
        ("input", want_inputs, onnx_graph.input),
        ("output", want_outputs, onnx_graph.output),
    ):
        got = [_decl_of(v) for v in have]
        for i, (w, g) in enumerate(zip(want, got, strict=False)):
            if (w.name, w.elem_type, w.shape) != g:
                return [
                    f"{path}: graph {graph.name!r} {kind} {i} is {g[0]!r} {_show_decl(g)}, the "
                    f"manifest's model makes it {w.name!r} {_show_decl((w.name, w.elem_type, w.shape))}"
                ]
        if len(got) != len(want):
            extra = got[len(want)][0] if len(got) > len(want) else want[len(got)].name
            return [
                f"{path}: graph {graph.name!r} declares {len(got)} {kind}s, the manifest's model "
                f"{len(want)} ({'unexpected' if len(got) > len(want) else 'missing'} {kind} "
                f"{extra!r})"
            ]
    return []


def _decl_of(value_info) -> tuple[str, int, tuple[int | str, ...]]:
    """``(name, element type, dims)`` of an ONNX graph input/output (a dim is its value, or its
    symbolic name)."""
    t = value_info.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
    return value_info.name, t.elem_type, dims


def _show_decl(decl: tuple[str, int, tuple[int | str, ...]]) -> str:
    import onnx

    name = (
        onnx.TensorProto.DataType.Name(decl[1])
        if decl[1] in onnx.TensorProto.DataType.values()
        else str(decl[1])
    )
    return f"{name.lower()}{list(decl[2])}"


def _external_locations(graph) -> set[str]:
    """``location`` of every externally stored tensor of an ONNX graph and its subgraphs."""
    import onnx

    tensors = list(graph.initializer)
    tensors += [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
    subgraphs = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            if attr.HasField("g"):
                subgraphs.append(attr.g)
            subgraphs.extend(attr.graphs)
    out = {
        e.value
        for t in tensors
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    for sub in subgraphs:
        out |= _external_locations(sub)
    return out


def servable_problems(root: Path, manifest: Manifest) -> list[str]:
    """``[problem]`` when the runtime cannot assemble the directory into a model (a dense weight
    the architecture needs is not stored, shapes that do not chain), else ``[]``."""
    from exporters.onnx.from_model import graph_spec_from_artifacts

    try:
        graph_spec_from_artifacts(artifacts_from_manifest(root, manifest))
    except ArtifactError as e:
        return [str(e)]
    return []


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
    raise_first(_problems(root, read.manifest, checksums=verify))
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
        tables[t.name] = TableArrays(
            name=t.name,
            layout=t.layout,
            num_embeddings=t.num_embeddings,
            embedding_dim=t.embedding_dim,
            bits=t.bits,
            feature_names=t.feature_names,
            arrays=arrays,
            entry=entry,
        )
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
