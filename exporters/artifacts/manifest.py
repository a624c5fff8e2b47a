"""``manifest.json`` as typed data: one schema check, a digest of itself, confined paths.

The manifest is the contract between the exporter and every reader (``verify``, ``eval
ARTIFACTS``, :class:`~exporters.runtime.predictor.Predictor`, the TorchRec loader): they all read it through
:func:`parse_manifest` and touch its files only through :func:`confined_path`.

* **Schema.** :func:`parse_manifest` turns the JSON object into a :class:`Manifest` of frozen
  dataclasses (:class:`TableEntry`, :class:`SharedGroupEntry`, :class:`DenseEntry`,
  :class:`OnnxEntry`, :class:`FileEntry`, ...) or raises :class:`ManifestError` listing every
  problem with the JSON path of its key (``manifest.json: tables[3].num_embeddings: expected a
  positive integer, got '100'``): versions, kinds, shapes as integers, every model table stored
  once, every feature listed once (in the model, the inputs and the ONNX graph), every file a
  section uses listed with a checksum, every path relative and inside the directory.
* **Digest.** ``manifest_sha256`` is the sha256 of the canonical JSON
  (:func:`compress.io.fingerprint.canonical_json`: sorted keys, compact separators, ASCII) of
  every other key; :func:`seal` adds it. It is checked
  before anything else is read, and the file must be byte for byte what :func:`dump_manifest`
  writes for its content, so one changed byte anywhere is caught, including changes that parse to
  the same values (``1e-05`` -> ``1E-05``). The digest detects accidents and edits, not forgery:
  whoever can write the directory can recompute it (sign the directory to prove its origin).
* **Versions.** Format 2 adds the digest and records the dense transform as an object
  ``{"name", "formula"}``. Format 1 directories (no digest) are still read, with a warning that a
  changed value in their manifest cannot be detected: their arrays are checksummed as before and
  every other check applies, and refusing them would strand models that took hours to fine-tune;
  re-exporting protects them (``verify`` refuses them unless told ``--allow-format-1``). Their
  dense transform is read as not known, since format 1 wrote ``"log3"`` whatever the data was. A
  format 1 manifest holding anything only format 2 writes (:func:`format_2_content`: a digest, a
  transform object, parity reference data, ...) is a format 2 manifest stripped of its protection
  and is refused.
* **Confinement.** :func:`confined_path` resolves ``root / rel`` and refuses an absolute path, a
  ``..`` component, a path not in normal form and one that leaves ``root`` through a symbolic link.
* **Quality gate.** An optional ``quality_gate`` object (:class:`QualityGateEntry`; format 2
  readers ignore top-level keys they do not parse, so older ones read it too) records a
  ``--max-auc-drop`` check; artifacts that failed it (kept with ``--keep-failed``) are read with a
  warning (:func:`quality_gate_warnings`), shown by ``verify`` and logged by every loader.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from compress.data.dense_transform import DENSE_TRANSFORMS, FORMULAS
from compress.errors import ArtifactError
from compress.io.dlrm_classes import known_classes, strategy_for
from compress.io.fingerprint import sha256_json
from compress.io.model_spec import DLRMSpec, TableSpec
from compress.methods import registry

FORMAT_NAME = "dqrm-compress-artifacts"
FORMAT_VERSION = 2
#: Oldest format this tool reads.
MIN_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DIGEST_KEY = "manifest_sha256"
#: Where format 2 stores the parity inputs and reference logits (``<PARITY_DIR>/<set>/``).
PARITY_DIR = "onnx/parity"
#: A manifest larger than this is refused before parsing (real ones are kilobytes).
MAX_MANIFEST_BYTES = 64 << 20
#: ``inputs.dense.transform`` name when no data was read (nothing says how the model's dense
#: inputs were made); raw text then needs ``--dense-transform``.
UNKNOWN_TRANSFORM = "unknown"

# A table's ``layout`` is the registered name of its method (compress.methods.registry), which
# says what the entry holds: the roles of its files, the code widths of packed codes, and whether
# it reads a shared array (then ``group`` and ``table_offset``, and ``shared_arrays`` entries whose
# dtypes and hash parameters that method checks).
#: ``dense[i].layout`` of a quantized MLP weight -> its ``bits``.
DENSE_LAYOUT_BITS = {"int8": 8, "int4_offset_packed": 4}

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ArtifactError):
    """A manifest that does not pass :func:`parse_manifest`; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems) - 1
        more = f" (and {n} more problem{'s' if n > 1 else ''})" if n > 0 else ""
        super().__init__(self.problems[0] + more)


# ---------------------------------------------------------------------------------------------
# Typed entries


@dataclass(frozen=True)
class FileEntry:
    """One file of the directory: its path relative to the root, size and sha256."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class TableEntry:
    """One stored table (``tables[i]``): shape, storage layout and files by role.

    ``group`` and ``table_offset`` are set only for the tables of a method that shares arrays (the
    shared array it reads and its row offset in it). ``raw`` is the entry as stored.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    method: str
    bits: int | None
    granularity: str | None
    layout: str
    files: Mapping[str, str]
    bytes: int
    feature_names: tuple[str, ...]
    group: str | None = None
    table_offset: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class SharedGroupEntry:
    """One parameter-sharing (ROBE-Z) array (``shared_arrays[i]``) with its hash parameters."""

    name: str
    tables: tuple[str, ...]
    cells: int
    block_size: int
    seed: int
    constants: tuple[int, int, int]
    prime: int
    dtype: str
    files: Mapping[str, str]
    bytes: int
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class DenseEntry:
    """One non-embedding tensor of the model (``dense[i]``): state-dict key, shape and file.

    ``layout`` is ``int8`` or ``int4_offset_packed`` for a quantized weight (``bits`` 8 or 4),
    ``None`` for a float tensor.
    """

    key: str
    shape: tuple[int, ...]
    file: str
    bytes: int
    layout: str | None = None
    bits: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class DenseTransformEntry:
    """``inputs.dense.transform``: the preprocessing the model's dense inputs were made with
    (:mod:`compress.data.dense_transform`); ``name`` ``None`` when not known."""

    name: str | None
    formula: str | None


@dataclass(frozen=True)
class OnnxGraphEntry:
    """One ONNX graph (``onnx.graphs.<name>``); ``features`` maps each sparse feature to its
    ``(values, lengths)`` input names (the full model's graph only)."""

    name: str
    file: str
    external_data: str | None
    features: Mapping[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class OnnxEntry:
    """The ``onnx`` section: graphs, the ORT session entries they are served with, and the one-hot
    layout hint of their export. ``raw`` is the section as stored (other keys are informational)."""

    graphs: Mapping[str, OnnxGraphEntry]
    session_config: Mapping[str, str]
    one_hot_features: tuple[str, ...]
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: ``onnx.parity.reference_data``: the stored parity feeds and reference logits (``.npy``)
    #: that ``verify --parity`` re-runs (:func:`exporters.onnx.parity.parity_report`).
    parity_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class QualityGateEntry:
    """``quality_gate`` (optional; written when the main job ran with ``--max-auc-drop``): the
    allowed AUC drop, whether the compressed model stayed within it and, when it did not, why.
    Artifacts that failed exist only because ``--keep-failed`` asked for them; readers warn
    (:func:`quality_gate_warnings`)."""

    max_auc_drop: float
    passed: bool
    failure: str | None = None

    def to_json(self) -> dict:
        return {"max_auc_drop": self.max_auc_drop, "passed": self.passed, "failure": self.failure}


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked ``manifest.json``. ``raw`` is the JSON object it was parsed from.

    ``files`` is empty and ``digest`` ``None`` for a manifest parsed before export finished
    (``complete=False``).
    """

    format_version: int
    spec: DLRMSpec
    tables: tuple[TableEntry, ...]
    shared_arrays: tuple[SharedGroupEntry, ...]
    dense: tuple[DenseEntry, ...]
    dense_transform: DenseTransformEntry
    sparse_inputs: Mapping[str, str]  # feature -> table
    onnx: OnnxEntry | None
    files: Mapping[str, FileEntry]
    digest: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)
    quality_gate: QualityGateEntry | None = None

    def referenced_files(self) -> list[str]:
        """Every file a section uses (tables, shared arrays, dense weights, ONNX graphs)."""
        out = [rel for t in self.tables for rel in t.files.values()]
        out += [rel for g in self.shared_arrays for rel in g.files.values()]
        out += [d.file for d in self.dense]
        for graph in (self.onnx.graphs if self.onnx else {}).values():
            out.append(graph.file)
            if graph.external_data is not None:
                out.append(graph.external_data)
        out += list(self.onnx.parity_files) if self.onnx else []
        return out


# ---------------------------------------------------------------------------------------------
# Canonical form and digest


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``manifest`` without its digest key."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return sha256_json(body)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of the file at ``path``, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def seal(manifest: dict) -> dict:
    """Record ``manifest``'s digest in it (as its last key, replacing an older one); returns it."""
    manifest.pop(DIGEST_KEY, None)
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    return manifest


def dump_manifest(manifest: Mapping[str, Any]) -> str:
    """The text of ``manifest.json`` for ``manifest``: the only spelling a reader accepts."""
    return json.dumps(manifest, indent=2, sort_keys=False) + "\n"


def decode_manifest(data: bytes, where: str) -> dict:
    """The JSON object in the bytes of a ``manifest.json``; :class:`ArtifactError` for anything
    that is not one (bad UTF-8, broken JSON, a key given twice, nesting too deep)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{where}: {len(data)} bytes, more than a manifest can hold")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{where}: not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{where}:{e.lineno}: broken JSON: {e.msg}") from None
    except _DuplicateKey as e:
        raise ArtifactError(f"{where}: broken JSON: key {e.args[0]!r} given twice") from None
    except RecursionError:
        raise ArtifactError(f"{where}: broken JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where}: not a dqrm-compress manifest (not a JSON object)")
    return obj


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def check_header(obj: Mapping[str, Any], where: str) -> int:
    """The ``format_version`` of a manifest object this tool reads; :class:`ArtifactError` for
    another format, a malformed version or a newer one."""
    if obj.get("format") != FORMAT_NAME:
        raise ArtifactError(
            f"{where}: not a dqrm-compress manifest (format is not {FORMAT_NAME!r})"
        )
    version = obj.get("format_version")
    if not _is_int(version):
        raise ArtifactError(f"{where}: format_version missing or not an integer")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: made by a newer dqrm-compress (format_version {version}, this tool reads up "
            f"to {FORMAT_VERSION}): upgrade dqrm-compress to read it"
        )
    if version < MIN_FORMAT_VERSION:
        raise ArtifactError(f"{where}: format_version {version} was never written by dqrm-compress")
    return version


def format_2_content(obj: Mapping[str, Any]) -> list[str]:
    """The JSON paths of what only format 2 writes (format 1 never did) found in ``obj``."""

    def at(*keys: str) -> Any:
        node: Any = obj
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        return node

    found = [DIGEST_KEY] if DIGEST_KEY in obj else []
    if isinstance(at("inputs", "dense", "transform"), Mapping):
        found.append("inputs.dense.transform (an object)")
    for *parent, key in (
        ("onnx", "out_of_range_ids"),
        ("onnx", "parity", "reference_data"),
        ("source", "data", "select"),
        ("source", "data", "report"),
    ):
        node = at(*parent)
        if isinstance(node, Mapping) and key in node:
            found.append(".".join((*parent, key)))
    files = obj.get("files")
    if isinstance(files, Mapping) and any(str(f).startswith(PARITY_DIR + "/") for f in files):
        found.append(f"files under {PARITY_DIR}/")
    return found


def format_1_warning(where: str) -> str:
    """What reading a format 1 manifest warns (and ``verify`` refuses unless allowed)."""
    return (
        f"{where}: format_version 1 manifest has no digest of itself, so a changed value in it "
        "cannot be detected (its files are still checksummed); re-export it with this version to "
        "protect it: dqrm-compress --recipe RECIPE CHECKPOINT --out DIR --force (the manifest's "
        "recipe.toml holds the recipe it was made with)"
    )


def check_integrity(obj: Mapping[str, Any], data: bytes, version: int, where: str) -> list[str]:
    """Check a manifest's digest and byte form (raise :class:`ArtifactError`); returns warnings
    (a format 1 manifest without a digest). A format 1 manifest holding format 2 content is
    refused (a downgrade that would hide a missing or stale digest)."""
    recorded = obj.get(DIGEST_KEY)
    newer = format_2_content(obj) if version < 2 else []
    if newer:
        raise ArtifactError(
            f"{where}: format_version {version} manifest holds {', '.join(newer)}, which only "
            "format 2 writes (a format 2 manifest relabelled to skip its digest check?): refused; "
            "re-export it or restore it from a copy"
        )
    if recorded is None and version < 2:
        warnings = [format_1_warning(where)]
    elif not isinstance(recorded, str) or not _SHA256.fullmatch(recorded):
        raise ArtifactError(
            f"{where}: {DIGEST_KEY} missing or not a sha256 hex digest (format_version {version} "
            "manifests record the digest of their content): damaged or edited after export"
        )
    elif recorded != manifest_digest(obj):
        raise ArtifactError(
            f"{where}: content does not match its {DIGEST_KEY} (changed or corrupted after "
            "export): re-export it, or restore it from a copy"
        )
    else:
        warnings = []
    if dump_manifest(obj).encode("utf-8") != data:
        raise ArtifactError(
            f"{where}: not byte for byte as dqrm-compress wrote it (reformatted, edited or "
            "corrupted after export): re-export it, or restore it from a copy"
        )
    return warnings


def read_manifest_bytes(data: bytes, where: str | Path = MANIFEST) -> tuple[Manifest, list[str]]:
    """The :class:`Manifest` in the bytes of a ``manifest.json`` and the warnings reading it gave,
    checked in order: JSON, format and version, digest and byte form, schema. Raises
    :class:`ArtifactError` (:class:`ManifestError` for schema problems, listing them all)."""
    where = str(where)
    obj = decode_manifest(data, where)
    version = check_header(obj, where)
    warnings = check_integrity(obj, data, version, where)
    manifest = parse_manifest(obj, where)
    return manifest, warnings + quality_gate_warnings(manifest, where)


def quality_gate_warnings(manifest: Manifest, where: str) -> list[str]:
    """One line when the artifacts failed the quality gate they were made under (kept with
    ``--keep-failed``), else none."""
    gate = manifest.quality_gate
    if gate is None or gate.passed:
        return []
    why = f": {gate.failure}" if gate.failure else ""
    return [
        f"{where}: these artifacts FAILED their quality gate (--max-auc-drop "
        f"{gate.max_auc_drop:g}){why}; they were kept with --keep-failed"
    ]


# ---------------------------------------------------------------------------------------------
# Paths


def path_problem(rel: object) -> str | None:
    """Why ``rel`` cannot name a file of an artifact directory, or ``None`` when it can: it must
    be a non-empty relative POSIX path in normal form with no ``..`` (checked without the disk)."""
    if not isinstance(rel, str) or not rel:
        return f"expected a relative path, got {_show(rel)}"
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


# ---------------------------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class _Kind:
    what: str
    test: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


INT = _Kind("an integer", _is_int)
POS_INT = _Kind("a positive integer", lambda v: _is_int(v) and v > 0)
NONNEG_INT = _Kind("a non-negative integer", lambda v: _is_int(v) and v >= 0)
STR = _Kind("a string", lambda v: isinstance(v, str))
NAME = _Kind("a non-empty string", lambda v: isinstance(v, str) and v != "")
OBJ = _Kind("an object", lambda v: isinstance(v, dict))
LIST = _Kind("a list", lambda v: isinstance(v, list))
BOOL = _Kind("true or false", lambda v: isinstance(v, bool))
SHA256 = _Kind("a sha256 hex digest", lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v)))
PATH = _Kind("a relative path", lambda v: path_problem(v) is None)
NONNEG_NUMBER = _Kind(
    "a non-negative number",
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf,
)


def _show(v: Any, limit: int = 60) -> str:
    text = repr(v) if isinstance(v, (str, bool)) or v is None else json.dumps(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Problems:
    """Problem lines of one manifest, each ``<where>: <JSON path>: <what>``."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(
            f"{self.where}: {path}: {message}" if path else f"{self.where}: {message}"
        )


class _Obj:
    """Reads the keys of one JSON object at ``path``; ``ok`` turns False with any problem."""

    def __init__(self, problems: _Problems, value: Any, path: str) -> None:
        self.problems, self.path, self.ok = problems, path, True
        if isinstance(value, dict):
            self.value: dict = value
        else:
            self.fail("", f"expected an object, got {_show(value)}")
            self.value = {}

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> None:
        self.ok = False
        self.problems.add(self.at(key) if key else self.path, message)

    def get(self, key: str, kind: _Kind, *, optional: bool = False, nullable: bool = False) -> Any:
        """The value of ``key`` if it is of ``kind`` (or null when ``nullable``), else ``None``
        with a problem recorded (a missing ``optional`` key is ``None`` without one)."""
        if key not in self.value:
            if not optional:
                self.fail(key, "missing")
            return None
        v = self.value[key]
        if v is None and nullable:
            return None
        if not kind.test(v):
            if kind is PATH and isinstance(v, str) and v:
                self.fail(key, str(path_problem(v)))
            else:
                self.fail(
                    key, f"expected {kind.what}{' or null' if nullable else ''}, got {_show(v)}"
                )
            return None
        return v

    def list_of(
        self, key: str, kind: _Kind, *, nullable: bool = False, optional: bool = False
    ) -> tuple | None:
        """A list of ``kind`` values as a tuple, or ``None`` (problem recorded)."""
        items = self.get(key, LIST, nullable=nullable, optional=optional)
        if items is None:
            return None
        good = True
        for i, v in enumerate(items):
            if not kind.test(v):
                self.fail(f"{key}[{i}]", f"expected {kind.what}, got {_show(v)}")
                good = False
        return tuple(items) if good else None

    def one_of(self, key: str, allowed: tuple, *, nullable: bool = False) -> Any:
        if key not in self.value:
            self.fail(key, "missing")
            return None
        v = self.value[key]
        if v is None and nullable:
            return None
        if not isinstance(v, (str, int)) or isinstance(v, bool) or v not in allowed:
            self.fail(key, f"expected one of {', '.join(map(repr, allowed))}, got {_show(v)}")
            return None
        return v

    def files(self, key: str, roles: frozenset[str] | None) -> dict[str, str] | None:
        """``{role: path}`` of ``key``; with ``roles``, exactly those roles."""
        obj = self.get(key, OBJ)
        if obj is None:
            return None
        sub = _Obj(self.problems, obj, self.at(key))
        out = {role: sub.get(role, PATH) for role in obj}
        if roles is not None and set(obj) != roles:
            sub.fail("", f"roles {sorted(obj)}, expected {sorted(roles)}")
        self.ok &= sub.ok
        return out if sub.ok else None


def parse_manifest(obj: Any, where: str | Path = MANIFEST, *, complete: bool = True) -> Manifest:
    """The :class:`Manifest` of the JSON object ``obj`` or :class:`ManifestError` listing every
    problem (``where`` names the file in each line). ``complete=False`` accepts a manifest still
    being written (no ``files`` and no digest yet, as in :func:`exporters.artifacts.write.save`'s staging
    directory). The digest and byte form are checked apart (:func:`check_integrity`)."""
    where = str(where)
    if not isinstance(obj, dict):
        raise ManifestError([f"{where}: not a dqrm-compress manifest (not a JSON object)"])
    version = check_header(obj, where)
    p = _Problems(where)
    top = _Obj(p, obj, "")
    spec = _parse_model(top, p)
    transform, sparse = _parse_inputs(top, p, spec, version)
    before = len(p.lines)
    tables = _parse_tables(top, p)
    groups = _parse_groups(top, p, optional=version < 2)
    tables_ok = len(p.lines) == before  # cross-checks only between sections that parsed
    dense = _parse_dense(top, p)
    onnx = _parse_onnx(top, p)
    gate = _parse_quality_gate(top, p)
    files = _parse_files(top, p) if complete else {}
    digest = obj.get(DIGEST_KEY) if complete else None
    if spec is not None:
        if tables_ok:
            _check_tables_cover_model(p, spec, tables, groups)
        if onnx is not None:
            _check_onnx_features(p, spec, onnx)
    if p.lines or spec is None or transform is None or sparse is None:
        raise ManifestError(p.lines or [f"{where}: malformed"])
    manifest = Manifest(
        format_version=version,
        spec=spec,
        tables=tuple(tables),
        shared_arrays=tuple(groups),
        dense=tuple(dense),
        dense_transform=transform,
        sparse_inputs=sparse,
        onnx=onnx,
        files=files,
        digest=digest,
        raw=obj,
        quality_gate=gate,
    )
    if complete:
        _check_files_listed(p, manifest)
        if p.lines:
            raise ManifestError(p.lines)
    return manifest


def _parse_model(top: _Obj, p: _Problems) -> DLRMSpec | None:
    raw = top.get("model", OBJ)
    if raw is None:
        return None
    m = _Obj(p, raw, "model")
    model_class = m.one_of("model_class", known_classes())
    dense_in = m.get("dense_in_features", POS_INT)
    tables: list[TableSpec] = []
    for i, raw in enumerate(m.get("tables", LIST) or ()):
        t = _Obj(p, raw, f"model.tables[{i}]")
        name = t.get("name", NAME)
        rows = t.get("num_embeddings", POS_INT)
        dim = t.get("embedding_dim", POS_INT)
        features = t.list_of("feature_names", NAME)
        if features == ():
            t.fail("feature_names", "empty (a table serves at least one feature)")
        if t.ok:
            tables.append(TableSpec(name, rows, dim, features))
        m.ok &= t.ok
    if "tables" in m.value and isinstance(m.value["tables"], list) and not m.value["tables"]:
        m.fail("tables", "empty (a DLRM has at least one embedding table)")
    bottom = m.list_of("dense_arch_layer_sizes", POS_INT)
    over = m.list_of("over_arch_layer_sizes", POS_INT)
    if over == ():
        m.fail("over_arch_layer_sizes", "empty")
    dcn_layers = m.get("dcn_num_layers", NONNEG_INT, optional=True, nullable=True)
    dcn_rank = m.get("dcn_low_rank_dim", POS_INT, optional=True, nullable=True)
    branch1 = m.list_of("interaction_branch1_layer_sizes", POS_INT, nullable=True, optional=True)
    branch2 = m.list_of("interaction_branch2_layer_sizes", POS_INT, nullable=True, optional=True)
    if model_class is not None:  # the parameters the class's interaction needs
        strategy = strategy_for(model_class)
        missing = strategy.missing_fields(
            {
                "dcn_num_layers": dcn_layers,
                "dcn_low_rank_dim": dcn_rank,
                "interaction_branch1_layer_sizes": branch1,
                "interaction_branch2_layer_sizes": branch2,
            }
        )
        if missing:
            m.fail(missing[0], f"{model_class} needs {' and '.join(strategy.interaction_fields)}")
    names = [t.name for t in tables]
    for name in sorted({n for n in names if names.count(n) > 1}):
        m.fail("tables", f"table {name!r} listed twice")
    features = [f for t in tables for f in t.feature_names]
    for f in sorted({f for f in features if features.count(f) > 1}):
        m.fail("tables", f"feature {f!r} served by more than one table (each is listed once)")
    listed = m.list_of("feature_names", NAME)
    if listed is not None and m.ok and list(listed) != features:
        m.fail("feature_names", f"{list(listed)} differ from the tables' features {features}")
    if not m.ok:
        return None
    return DLRMSpec(
        model_class=model_class,
        tables=tuple(tables),
        dense_in_features=dense_in,
        dense_arch_layer_sizes=bottom,
        over_arch_layer_sizes=over,
        dcn_num_layers=dcn_layers,
        dcn_low_rank_dim=dcn_rank,
        interaction_branch1_layer_sizes=branch1,
        interaction_branch2_layer_sizes=branch2,
    )


def _parse_inputs(
    top: _Obj, p: _Problems, spec: DLRMSpec | None, version: int
) -> tuple[DenseTransformEntry | None, dict[str, str] | None]:
    raw = top.get("inputs", OBJ)
    if raw is None:
        return None, None
    inputs = _Obj(p, raw, "inputs")
    dense = _Obj(p, inputs.get("dense", OBJ) or {}, "inputs.dense")
    dense.one_of("dtype", ("float32",))
    shape = dense.get("shape", LIST)
    if shape is not None and spec is not None and shape != ["batch", spec.dense_in_features]:
        dense.fail("shape", f"expected ['batch', {spec.dense_in_features}], got {_show(shape)}")
    transform = _parse_transform(dense, version)
    sparse_raw = inputs.get("sparse", OBJ)
    sparse_obj = _Obj(p, sparse_raw or {}, "inputs.sparse")
    sparse: dict[str, str] = {}
    for f, raw in sparse_obj.value.items():
        entry = _Obj(p, raw, f"inputs.sparse.{f}")
        table = entry.get("table", NAME)
        entry.one_of("dtype", ("int64",))
        if entry.get("jagged", BOOL) is False:
            entry.fail("jagged", "expected true (inputs are jagged bags)")
        if entry.ok:
            sparse[f] = table
        sparse_obj.ok &= entry.ok
    if spec is not None and sparse_raw is not None:
        expected = {f: spec.table_of_feature(f).name for f in spec.feature_names}
        for f in spec.feature_names:
            if f not in sparse_obj.value:
                sparse_obj.fail("", f"no entry for feature {f!r}")
            elif f in sparse and sparse[f] != expected[f]:
                sparse_obj.fail(f"{f}.table", f"{sparse[f]!r}, the model reads {expected[f]!r}")
        for f in sparse_obj.value:
            if f not in expected:
                sparse_obj.fail(f, "not a feature of the model")
    ok = inputs.ok and dense.ok and sparse_obj.ok
    return (transform if ok else None), (sparse if ok else None)


def _parse_transform(dense: _Obj, version: int) -> DenseTransformEntry | None:
    if version < 2:  # format 1 wrote "log3" whatever the data was: not a record of anything
        dense.get("transform", STR)
        return DenseTransformEntry(None, None)
    raw = dense.get("transform", OBJ)
    if raw is None:
        return None
    t = _Obj(dense.problems, raw, "inputs.dense.transform")
    name = t.one_of("name", (*DENSE_TRANSFORMS, UNKNOWN_TRANSFORM))
    formula = t.get("formula", STR, nullable=True)
    if name is not None and t.ok:
        want = FORMULAS.get(name)
        if formula != want:
            t.fail("formula", f"{_show(formula)}, transform {name!r} is {_show(want)}")
    dense.ok &= t.ok
    if not t.ok:
        return None
    return DenseTransformEntry(None if name == UNKNOWN_TRANSFORM else name, formula)


def _parse_tables(top: _Obj, p: _Problems) -> list[TableEntry]:
    out = []
    for i, raw in enumerate(top.get("tables", LIST) or ()):
        t = _Obj(p, raw, f"tables[{i}]")
        layout = t.one_of("layout", registry.names())
        method = registry.get(layout) if layout is not None else None
        values = {
            "name": t.get("name", NAME),
            "num_embeddings": t.get("num_embeddings", POS_INT),
            "embedding_dim": t.get("embedding_dim", POS_INT),
            "method": t.get("method", NAME),
            "bits": t.get("bits", POS_INT, nullable=True),
            "granularity": t.get("granularity", STR, nullable=True),
            "bytes": t.get("bytes", NONNEG_INT),
            "feature_names": t.list_of("feature_names", NAME),
        }
        files = t.files("files", method.file_roles() if method is not None else None)
        if method is not None and method.packed_bits and t.ok:
            bits, dim = values["bits"], values["embedding_dim"]
            if bits not in method.packed_bits:
                t.fail(
                    "bits",
                    f"expected one of {method.packed_bits} for layout {layout!r}, got {bits}",
                )
            elif dim * bits % 8:
                t.fail("bits", f"{dim} values of {bits} bits do not fill whole bytes")
        group = offset = None
        if method is not None and method.shares_arrays:
            group = t.get("group", NAME)
            offset = t.get("table_offset", NONNEG_INT)
        if t.ok:
            out.append(
                TableEntry(
                    layout=layout, files=files, group=group, table_offset=offset, raw=raw, **values
                )
            )
        top.ok &= t.ok
    return out


def _parse_groups(top: _Obj, p: _Problems, optional: bool) -> list[SharedGroupEntry]:
    """The ``shared_arrays`` entries, whose dtypes, files and hash parameters the method that
    shares arrays checks (:func:`compress.methods.registry.sharing_method`)."""
    out = []
    sharing = registry.sharing_method()
    for i, raw in enumerate(top.get("shared_arrays", LIST, optional=optional) or ()):
        g = _Obj(p, raw, f"shared_arrays[{i}]")
        name = g.get("name", NAME)
        missing = [k for k in ("seed", "constants", "prime") if k not in g.value]
        if missing:  # the hash parameters, named together
            g.fail("", f"shared array {name!r}: missing {', '.join(missing)} (hash parameters)")
        dtype = g.one_of("dtype", sharing.group_dtypes)
        values = {
            "name": name,
            "tables": g.list_of("tables", NAME),
            "cells": g.get("cells", POS_INT),
            "block_size": g.get("block_size", POS_INT),
            "seed": g.get("seed", NONNEG_INT) if not missing else None,
            "constants": g.list_of("constants", NONNEG_INT) if not missing else None,
            "prime": g.get("prime", POS_INT) if not missing else None,
            "bytes": g.get("bytes", NONNEG_INT),
        }
        roles = frozenset(sharing.group_arrays(dtype, 1)) if dtype is not None else None
        files = g.files("files", roles)
        if g.ok:
            problem = sharing.group_hash_problem(
                name, values["seed"], values["constants"], values["prime"]
            )
            if problem is not None:
                g.fail(*problem)
        if g.ok:
            values["constants"] = tuple(values["constants"])
            out.append(SharedGroupEntry(dtype=dtype, files=files, raw=raw, **values))
        top.ok &= g.ok
    return out


def _parse_dense(top: _Obj, p: _Problems) -> list[DenseEntry]:
    out = []
    keys: set[str] = set()
    for i, raw in enumerate(top.get("dense", LIST) or ()):
        d = _Obj(p, raw, f"dense[{i}]")
        key = d.get("key", NAME)
        shape = d.list_of("shape", NONNEG_INT)
        file = d.get("file", PATH)
        nbytes = d.get("bytes", NONNEG_INT)
        layout = d.value.get("layout")
        bits = None
        if layout is not None:
            layout = d.one_of("layout", tuple(DENSE_LAYOUT_BITS))
            bits = d.get("bits", POS_INT)
            if layout is not None and bits is not None and bits != DENSE_LAYOUT_BITS[layout]:
                d.fail("bits", f"{bits}, layout {layout!r} holds {DENSE_LAYOUT_BITS[layout]}")
            if shape is not None and len(shape) != 2:
                d.fail("shape", f"a quantized weight is [out, in], got {list(shape)}")
        if key in keys:
            d.fail("key", f"{key!r} listed twice")
        keys.add(key)
        if d.ok:
            out.append(DenseEntry(key, shape, file, nbytes, layout, bits, raw=raw))
        top.ok &= d.ok
    return out


def _parse_onnx(top: _Obj, p: _Problems) -> OnnxEntry | None:
    raw = top.get("onnx", OBJ, optional=True, nullable=True)
    if raw is None:
        return None
    o = _Obj(p, raw, "onnx")
    graphs_obj = _Obj(p, o.get("graphs", OBJ) or {}, "onnx.graphs")
    graphs: dict[str, OnnxGraphEntry] = {}
    for name, graw in graphs_obj.value.items():
        g = _Obj(p, graw, f"onnx.graphs.{name}")
        file = g.get("file", PATH)
        external = g.get("external_data", PATH, nullable=True)
        features: dict[str, tuple[str, str]] = {}
        if name == "model":
            for f, io in (g.get("features", OBJ) or {}).items():
                fi = _Obj(p, io, f"onnx.graphs.model.features.{f}")
                values, lengths = fi.get("values", NAME), fi.get("lengths", NAME)
                if fi.ok:
                    features[f] = (values, lengths)
                g.ok &= fi.ok
        if g.ok:
            graphs[name] = OnnxGraphEntry(name, file, external, features)
        graphs_obj.ok &= g.ok
    if graphs_obj.value and "model" not in graphs_obj.value:
        graphs_obj.fail("", "no 'model' graph")
    session = o.get("session_config", OBJ) or {}
    for k, v in session.items():
        if not isinstance(v, str):
            o.fail(f"session_config.{k}", f"expected a string, got {_show(v)}")
    export = _Obj(p, o.get("export", OBJ, optional=True) or {}, "onnx.export")
    one_hot = export.list_of("one_hot_features", NAME, optional=True) or ()
    parity_files = _parse_parity_files(o)
    o.ok &= graphs_obj.ok and export.ok
    top.ok &= o.ok
    if not o.ok:
        return None
    return OnnxEntry(graphs, dict(session), tuple(one_hot), raw=raw, parity_files=parity_files)


def _parse_parity_files(o: _Obj) -> tuple[str, ...]:
    """Paths of ``onnx.parity.reference_data.<set>.inputs.<name>`` and ``.logits`` (optional:
    absent in directories exported before ``verify --parity``)."""
    parity = _Obj(o.problems, o.get("parity", OBJ, optional=True) or {}, o.at("parity"))
    stored = parity.get("reference_data", OBJ, optional=True) or {}
    out: list[str] = []
    for set_name, raw in stored.items():
        entry = _Obj(o.problems, raw, parity.at(f"reference_data.{set_name}"))
        inputs = _Obj(o.problems, entry.get("inputs", OBJ) or {}, entry.at("inputs"))
        out += [inputs.get(name, PATH) for name in inputs.value]
        out.append(entry.get("logits", PATH))
        o.ok &= entry.ok and inputs.ok
    o.ok &= parity.ok
    return tuple(out) if o.ok else ()


def _parse_quality_gate(top: _Obj, p: _Problems) -> QualityGateEntry | None:
    """The optional ``quality_gate`` section (absent: no gate was set)."""
    raw = top.get("quality_gate", OBJ, optional=True)
    if raw is None:
        return None
    g = _Obj(p, raw, "quality_gate")
    limit = g.get("max_auc_drop", NONNEG_NUMBER)
    passed = g.get("passed", BOOL)
    failure = g.get("failure", STR, nullable=True)
    if passed is False and not failure:
        g.fail("failure", "a failed gate says why")
    top.ok &= g.ok
    return QualityGateEntry(float(limit), passed, failure) if g.ok else None


def _parse_files(top: _Obj, p: _Problems) -> dict[str, FileEntry]:
    obj = top.get("files", OBJ)
    out: dict[str, FileEntry] = {}
    for rel, raw in (obj or {}).items():
        path = f"files[{json.dumps(rel)}]"
        problem = path_problem(rel)
        if problem is not None:
            p.add(path, problem)
            continue
        f = _Obj(p, raw, path)
        sha, nbytes = f.get("sha256", SHA256), f.get("bytes", NONNEG_INT)
        if f.ok:
            out[rel] = FileEntry(rel, sha, nbytes)
    return out


def _check_tables_cover_model(
    p: _Problems, spec: DLRMSpec, tables: list[TableEntry], groups: list[SharedGroupEntry]
) -> None:
    """Every model table stored exactly once, with the model's shape and features; every table
    of a method that shares arrays has its group listed, listing it, at the row offset the
    group's order gives it."""
    by_name: dict[str, int] = {}
    for i, t in enumerate(tables):
        if t.name in by_name:
            p.add(f"tables[{i}].name", f"table {t.name!r} stored twice")
        by_name.setdefault(t.name, i)
    for i, t in enumerate(tables):
        if t.name not in {s.name for s in spec.tables}:
            p.add(f"tables[{i}].name", f"{t.name!r} is not a table of the model")
            continue
        s = spec.table(t.name)
        for key in ("num_embeddings", "embedding_dim", "feature_names"):
            if getattr(t, key) != getattr(s, key):
                got = getattr(t, key)
                p.add(
                    f"tables[{i}].{key}",
                    f"{_show(list(got) if isinstance(got, tuple) else got)}, the model section "
                    f"says {_show(list(getattr(s, key)) if key == 'feature_names' else getattr(s, key))}",
                )
    for s in spec.tables:
        if s.name not in by_name:
            p.add("tables", f"no entry for table {s.name!r} of the model")
    group_names = [g.name for g in groups]
    for name in sorted({n for n in group_names if group_names.count(n) > 1}):
        p.add("shared_arrays", f"shared array {name!r} listed twice")
    rows = {t.name: t.num_embeddings for t in tables}
    sharing = registry.sharing_method()
    reads_group = {t.name for t in tables if registry.get(t.layout).shares_arrays}
    for gi, g in enumerate(groups):
        offset = 0
        for name in g.tables:
            t = next((t for t in tables if t.name == name), None)
            if t is None or t.name not in reads_group or t.group != g.name:
                p.add(
                    f"shared_arrays[{gi}].tables",
                    f"{name!r} is not a {sharing.name} table of this group",
                )
            elif t.table_offset != offset:
                p.add(
                    f"tables[{by_name[name]}].table_offset",
                    f"{t.table_offset}, its place in shared array {g.name!r} gives {offset}",
                )
            offset += rows.get(name, 0)
    for i, t in enumerate(tables):
        if t.name not in reads_group:
            continue
        if t.group not in group_names:
            p.add(f"tables[{i}].group", f"shared array {t.group!r} is not listed")
        elif t.name not in next(g for g in groups if g.name == t.group).tables:
            p.add(f"tables[{i}].group", f"shared array {t.group!r} does not list {t.name!r}")


def _check_onnx_features(p: _Problems, spec: DLRMSpec, onnx: OnnxEntry) -> None:
    model = onnx.graphs.get("model")
    if model is not None and set(model.features) != set(spec.feature_names):
        p.add(
            "onnx.graphs.model.features",
            f"features {sorted(model.features)}, the model has {sorted(spec.feature_names)}",
        )
    unknown = sorted(set(onnx.one_hot_features) - set(spec.feature_names))
    if unknown:
        p.add("onnx.export.one_hot_features", f"not features of the model: {unknown}")


def _check_files_listed(p: _Problems, manifest: Manifest) -> None:
    for rel in manifest.referenced_files():
        if rel not in manifest.files:
            p.add("files", f"{rel!r} is used by the manifest but has no checksum entry")
