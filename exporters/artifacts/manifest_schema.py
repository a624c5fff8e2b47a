"""``manifest.json`` as typed data: its format constants and one frozen dataclass per entry.

The manifest is the contract between the exporter and every reader (``verify``, ``eval
ARTIFACTS``, :class:`~exporters.runtime.predictor.Predictor`, the TorchRec loader). They read it
through :func:`exporters.artifacts.manifest_integrity.read_manifest_bytes` (digest and byte form,
then :func:`exporters.artifacts.manifest_parse.parse_manifest`) and receive a :class:`Manifest` of
the entries below, or a :class:`ManifestError` listing every problem with the JSON path of its key
(``manifest.json: tables[3].num_embeddings: expected a positive integer, got '100'``).

* **Versions.** Format 2 adds the digest of the manifest's own content (:data:`DIGEST_KEY`) and
  records the dense transform as an object ``{"name", "formula"}``. Format 3 stores every table
  once: the full graph is ``model.onnx`` at the directory's root and reads the table files in
  place through ONNX external data, so a graph entry's ``external_data`` is the list of files it
  reads (format 2: ``onnx/model.onnx`` and at most one ``.data`` file beside it, holding a copy
  of the tables). Format 2 and format 1 directories (no digest) are still read, the latter with a
  warning (:mod:`exporters.artifacts.manifest_integrity`).
* **Quality gate.** An optional ``quality_gate`` object (:class:`QualityGateEntry`; format 2
  readers ignore top-level keys they do not parse, so older ones read it too) records a
  ``--max-auc-drop`` check; artifacts that failed it (kept with ``--keep-failed``) are read with a
  warning, shown by ``verify`` and logged by every loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from compress.errors import ArtifactError
from compress.io.model_spec import DLRMSpec

FORMAT_NAME = "dqrm-compress-artifacts"
FORMAT_VERSION = 3
#: First format whose graphs read the table files in place (``external_data``: a list of files).
GRAPHS_READ_TABLES_VERSION = 3
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


class ManifestError(ArtifactError):
    """A manifest that does not pass :func:`~exporters.artifacts.manifest_parse.parse_manifest`;
    ``problems`` holds one line each."""

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
    """One ONNX graph (``onnx.graphs.<name>``); ``external_data`` the directory's files its
    initializers read (format 3: the table files and at most one ``.data`` file; format 2: none
    or one ``.data`` file, stored as a path or null); ``features`` maps each sparse feature to
    its ``(values, lengths)`` input names (the full model's graph only)."""

    name: str
    file: str
    external_data: tuple[str, ...]
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
    (:func:`~exporters.artifacts.manifest_integrity.quality_gate_warnings`)."""

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
            out += [rel for rel in graph.external_data if rel not in out]
        out += list(self.onnx.parity_files) if self.onnx else []
        return out
