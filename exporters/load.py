"""Read an artifact directory back: the manifest, checksums, and memory-mapped arrays.

The runtime side of :mod:`exporters.artifacts`. Nothing here trusts the directory:

* :func:`verify_artifacts` lists every problem it finds, one line each, naming the file: a missing
  or broken ``manifest.json``, a ``format_version`` newer than this tool reads, a missing file, a
  size or sha256 that differs from the manifest, an array whose dtype or shape is not what the
  manifest says (read from the ``.npy`` header, no data loaded), a truncated ``.npy``.
* :func:`load_artifacts` runs those checks (``verify=True``, the default, includes the checksums
  of every file) and raises :class:`~compress.errors.ArtifactError` with the first problem, then maps
  every array with ``np.load(mmap_mode="r", allow_pickle=False)``: opening a multi-GB directory
  reads only headers, and pages are read when rows are used.

Callers that hand the arrays to ONNX Runtime or FBGEMM must load with ``verify=True``: a flipped
byte in a packed table is caught here, not as a crash inside a kernel.

Example::

    arts = load_artifacts("out/dlrm.int4_qat")
    arts.tables["t_cat_0"].arrays["data"]      # numpy.memmap uint8 [R, D*bits/8]
    arts.spec.feature_names                     # the model's sparse features, in order
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ArtifactError
from compress.robe_hash import ROBE_PRIME, robe_constants
from compress.spec import DLRMSpec, TableSpec
from exporters.artifacts import FORMAT_NAME, FORMAT_VERSION, MANIFEST, sha256_file

#: ``(numpy dtype name, shape)`` an array must have; ``None`` dtype: any float.
ArraySpec = tuple[str | None, tuple[int, ...]]


def _packed_width(entry: Mapping[str, Any]) -> int:
    return int(entry["embedding_dim"]) * int(entry["bits"]) // 8


def _rowwise_arrays(entry: Mapping[str, Any]) -> dict[str, ArraySpec]:
    rows = int(entry["num_embeddings"])
    return {
        "data": ("uint8", (rows, _packed_width(entry))),
        "scale": ("float16", (rows,)),
        "bias": ("float16", (rows,)),
    }


def _tablewise_arrays(entry: Mapping[str, Any]) -> dict[str, ArraySpec]:
    rows = int(entry["num_embeddings"])
    return {"data": ("uint8", (rows, _packed_width(entry))), "scale": ("float32", ())}


def _float_arrays(dtype: str) -> Callable[[Mapping[str, Any]], dict[str, ArraySpec]]:
    def arrays(entry: Mapping[str, Any]) -> dict[str, ArraySpec]:
        return {"data": (dtype, (int(entry["num_embeddings"]), int(entry["embedding_dim"])))}

    return arrays


#: The arrays each table layout stores (manifest ``tables[i].files`` roles), by layout name. A new
#: layout adds one entry here (and a graph builder in :mod:`exporters.graph_spec`); a layout missing
#: here is still loaded and checksummed, only its dtypes and shapes go unchecked. ``robe`` tables
#: store nothing of their own: they read their group's shared array.
TABLE_LAYOUT_ARRAYS: dict[str, Callable[[Mapping[str, Any]], dict[str, ArraySpec]]] = {
    "fp32": _float_arrays("float32"),
    "fp16": _float_arrays("float16"),
    "rowwise": _rowwise_arrays,
    "tablewise": _tablewise_arrays,
    "robe": lambda entry: {},
}

#: numpy dtype of a shared (ROBE-Z) array by its manifest ``dtype``.
SHARED_ARRAY_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
#: Role prefix under which a table's :attr:`TableArrays.arrays` holds its group's shared arrays.
SHARED_ROLE = "shared."


def _shared_arrays(group: Mapping[str, Any]) -> dict[str, ArraySpec]:
    out: dict[str, ArraySpec] = {
        "data": (SHARED_ARRAY_DTYPES[group["dtype"]], (int(group["cells"]),))
    }
    if group["dtype"] == "int8":
        out["scale"] = ("float32", (1,))
    return out


def dense_array_spec(entry: Mapping[str, Any]) -> ArraySpec:
    """What a ``dense`` entry's file holds: INT8 codes, packed INT4 codes, or a float tensor."""
    shape = tuple(int(s) for s in entry["shape"])
    layout = entry.get("layout")
    if layout == "int8":
        return "int8", shape
    if layout == "int4_offset_packed":
        return "uint8", (shape[0], math.ceil(shape[1] / 2))
    return None, shape


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
    """A loaded artifact directory (arrays memory-mapped, read-only)."""

    path: Path
    manifest: dict
    spec: DLRMSpec
    tables: dict[str, TableArrays]  # in the model's table order
    dense: dict[str, np.ndarray]  # state-dict key -> array as stored
    dense_entries: dict[str, dict]  # state-dict key -> manifest entry

    @property
    def onnx(self) -> dict | None:
        """The manifest's ``onnx`` section (``None`` for directories exported without graphs)."""
        return self.manifest.get("onnx")

    def file(self, rel: str) -> Path:
        return self.path / rel


# ---------------------------------------------------------------------------------------------
# Manifest


def read_manifest(path: str | Path) -> dict:
    """``manifest.json`` of the directory ``path``, checked for format and version."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory")
    if not mpath.is_file():
        raise ArtifactError(f"{mpath}: missing (not an artifact directory)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}:{e.lineno}: broken JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: unreadable ({e})") from None
    check_manifest(manifest, mpath)
    return manifest


def check_manifest(manifest: Any, where: str | Path) -> None:
    """Raise :class:`ArtifactError` unless ``manifest`` is a manifest this tool can read."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(
            f"{where}: not a dqrm-compress manifest (format is not {FORMAT_NAME!r})"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{where}: format_version missing or not an integer")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: made by a newer dqrm-compress (format_version {version}, this tool reads up "
            f"to {FORMAT_VERSION}): upgrade dqrm-compress to read it"
        )
    for key, kind in (("model", dict), ("tables", list), ("dense", list), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{where}: key {key!r} missing or not a {kind.__name__}")
    for group in manifest.get("shared_arrays") or []:
        check_shared_group(group, where)


SHARED_GROUP_KEYS = (
    "name",
    "tables",
    "cells",
    "block_size",
    "seed",
    "constants",
    "prime",
    "dtype",
    "files",
)


def check_shared_group(group: Any, where: str | Path) -> None:
    """A shared-array entry must carry every hash parameter, and its constants must be the ones
    its seed draws (so a lookup can never silently use different hash functions)."""
    name = group.get("name", "?") if isinstance(group, dict) else "?"
    if not isinstance(group, dict):
        raise ArtifactError(f"{where}: shared_arrays entry is not an object")
    missing = [k for k in SHARED_GROUP_KEYS if k not in group]
    if missing:
        raise ArtifactError(
            f"{where}: shared array {name!r}: missing {', '.join(missing)} (hash parameters)"
        )
    try:
        expected = list(robe_constants(int(group["seed"])))
        matches = list(group["constants"]) == expected and int(group["prime"]) == ROBE_PRIME
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: shared array {name!r}: bad hash parameters ({e})") from None
    if not matches:
        raise ArtifactError(
            f"{where}: shared array {name!r}: hash constants {group['constants']} (P={group['prime']}) "
            f"do not match seed {group['seed']} ({expected}, P={ROBE_PRIME})"
        )


def spec_from_manifest(manifest: Mapping[str, Any]) -> DLRMSpec:
    """The :class:`DLRMSpec` recorded in the manifest's ``model`` section."""
    m = manifest["model"]
    try:
        tables = tuple(
            TableSpec(
                name=t["name"],
                num_embeddings=int(t["num_embeddings"]),
                embedding_dim=int(t["embedding_dim"]),
                feature_names=tuple(t["feature_names"]),
            )
            for t in m["tables"]
        )
        return DLRMSpec(
            model_class=m["model_class"],
            tables=tables,
            dense_in_features=int(m["dense_in_features"]),
            dense_arch_layer_sizes=tuple(m["dense_arch_layer_sizes"]),
            over_arch_layer_sizes=tuple(m["over_arch_layer_sizes"]),
            dcn_num_layers=m.get("dcn_num_layers"),
            dcn_low_rank_dim=m.get("dcn_low_rank_dim"),
            interaction_branch1_layer_sizes=_opt_tuple(m.get("interaction_branch1_layer_sizes")),
            interaction_branch2_layer_sizes=_opt_tuple(m.get("interaction_branch2_layer_sizes")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{MANIFEST}: model section is incomplete ({e!r})") from None


def _opt_tuple(x: list | None) -> tuple | None:
    return tuple(x) if x is not None else None


# ---------------------------------------------------------------------------------------------
# Verification


def verify_artifacts(path: str | Path, checksums: bool = True) -> list[str]:
    """Every problem of the artifact directory ``path``, one line each naming the file; ``[]``
    when intact. ``checksums=False`` skips hashing (structure, sizes and headers only)."""
    root = Path(path)
    try:
        manifest = read_manifest(root)
    except ArtifactError as e:
        return [str(e)]
    return _problems(root, manifest, checksums)


def _problems(root: Path, manifest: dict, checksums: bool) -> list[str]:
    problems: list[str] = []
    bad: set[str] = set()
    files = manifest["files"]
    for rel, meta in files.items():
        problem = _file_problem(root / rel, meta, checksums)
        if problem:
            problems.append(problem)
            bad.add(rel)
    try:
        referenced, arrays = referenced_files(manifest), expected_arrays(manifest)
    except (KeyError, TypeError, AttributeError) as e:
        return [*problems, f"{root / MANIFEST}: malformed entry ({type(e).__name__}: {e})"]
    for rel in referenced:
        if rel not in files:
            problems.append(f"{root / rel}: used by the manifest but has no checksum entry")
    for rel, expected in arrays.items():
        p = root / rel
        if rel not in bad and p.is_file():
            problem = check_npy(p, expected)
            if problem:
                problems.append(problem)
    return problems


def _file_problem(p: Path, meta: Mapping[str, Any], checksums: bool) -> str | None:
    if not p.is_file():
        return f"{p}: missing"
    size = p.stat().st_size
    if size != meta.get("bytes"):
        return f"{p}: {size} bytes, the manifest says {meta.get('bytes')}"
    if checksums and sha256_file(p) != meta.get("sha256"):
        return f"{p}: checksum mismatch (changed or corrupted after export)"
    return None


def referenced_files(manifest: Mapping[str, Any]) -> list[str]:
    """Every file the manifest's sections point at (tables, dense weights, ONNX graphs)."""
    out = [rel for t in manifest["tables"] for rel in t.get("files", {}).values()]
    out += [d["file"] for d in manifest["dense"]]
    out += [rel for g in manifest.get("shared_arrays") or () for rel in g.get("files", {}).values()]
    for graph in (manifest.get("onnx") or {}).get("graphs", {}).values():
        out.append(graph["file"])
        if graph.get("external_data"):
            out.append(graph["external_data"])
    return out


def expected_arrays(manifest: Mapping[str, Any]) -> dict[str, ArraySpec]:
    """``{file: (dtype, shape)}`` for every ``.npy`` whose layout this tool knows."""
    out: dict[str, ArraySpec] = {}
    for t in manifest["tables"]:
        layout_arrays = TABLE_LAYOUT_ARRAYS.get(t.get("layout"))
        if layout_arrays is None:
            continue
        try:
            wanted = layout_arrays(t)
        except (KeyError, TypeError, ValueError):
            continue
        for role, rel in t.get("files", {}).items():
            if role in wanted:
                out[rel] = wanted[role]
    for d in manifest["dense"]:
        out[d["file"]] = dense_array_spec(d)
    for g in manifest.get("shared_arrays") or ():
        try:
            wanted = _shared_arrays(g)
        except (KeyError, TypeError, ValueError):
            continue
        out.update(
            {rel: wanted[role] for role, rel in g.get("files", {}).items() if role in wanted}
        )
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


# ---------------------------------------------------------------------------------------------
# Loading


def load_artifacts(path: str | Path, verify: bool = True) -> Artifacts:
    """Open the artifact directory ``path``: checks (see the module docstring), then maps arrays.

    Raises :class:`ArtifactError` with the first problem (and how many more there are).
    ``verify=False`` skips the sha256 of every file but still checks sizes and array headers.
    """
    root = Path(path)
    manifest = read_manifest(root)
    raise_first(_problems(root, manifest, checksums=verify))
    return artifacts_from_manifest(root, manifest)


def raise_first(problems: list[str]) -> None:
    """Raise :class:`ArtifactError` with the first of ``problems``, if any."""
    if problems:
        n = len(problems) - 1
        more = f" (and {n} more problem{'s' if n > 1 else ''})" if n else ""
        raise ArtifactError(problems[0] + more)


def artifacts_from_manifest(root: str | Path, manifest: dict) -> Artifacts:
    """Map the arrays of a directory whose manifest is ``manifest`` (already read and checked;
    ``manifest.json`` itself need not exist yet, as in :func:`exporters.artifacts.save`'s staging
    directory)."""
    root = Path(root)
    spec = spec_from_manifest(manifest)
    groups = {g["name"]: g for g in manifest.get("shared_arrays") or ()}
    group_arrays = {
        name: {SHARED_ROLE + role: map_npy(root / rel) for role, rel in g.get("files", {}).items()}
        for name, g in groups.items()
    }
    tables: dict[str, TableArrays] = {}
    for entry in manifest["tables"]:
        try:
            arrays = {role: map_npy(root / rel) for role, rel in entry["files"].items()}
            if entry.get("group") is not None:
                if entry["group"] not in groups:
                    raise ArtifactError(
                        f"{root / MANIFEST}: table {entry['name']!r} reads shared array "
                        f"{entry['group']!r}, which the manifest does not list"
                    )
                arrays.update(group_arrays[entry["group"]])
                entry = {**entry, "shared": groups[entry["group"]]}
            tables[entry["name"]] = TableArrays(
                name=entry["name"],
                layout=entry["layout"],
                num_embeddings=int(entry["num_embeddings"]),
                embedding_dim=int(entry["embedding_dim"]),
                bits=entry.get("bits"),
                feature_names=tuple(entry.get("feature_names", ())),
                arrays=arrays,
                entry=entry,
            )
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{root / MANIFEST}: table entry is incomplete ({e!r})") from None
    missing = [t.name for t in spec.tables if t.name not in tables]
    if missing:
        raise ArtifactError(f"{root / MANIFEST}: no stored table for {missing}")
    tables = {t.name: tables[t.name] for t in spec.tables}
    dense = {d["key"]: map_npy(root / d["file"]) for d in manifest["dense"]}
    entries = {d["key"]: d for d in manifest["dense"]}
    return Artifacts(root, manifest, spec, tables, dense, entries)


def map_npy(path: Path) -> np.ndarray:
    """``np.load(path, mmap_mode="r", allow_pickle=False)``; errors name the file."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{path}: not a readable .npy file ({e})") from None
