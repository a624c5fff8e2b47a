"""``manifest.json``'s schema check: a JSON object in, a :class:`Manifest` or every problem out.

:func:`parse_manifest` turns the JSON object into a
:class:`~exporters.artifacts.manifest_schema.Manifest` of frozen dataclasses or raises
:class:`~exporters.artifacts.manifest_schema.ManifestError` listing every problem with the JSON
path of its key (``manifest.json: tables[3].num_embeddings: expected a positive integer, got
'100'``): versions (:func:`check_header`), kinds, shapes as integers, every model table stored
once, every feature listed once (in the model, the inputs and the ONNX graph), every file a
section uses listed with a checksum, every path relative and inside the directory
(:mod:`exporters.artifacts.confined_paths`). The model, inputs, quality gate and ``files``
sections are parsed here, the sections that describe stored files in
:mod:`exporters.artifacts.manifest_storage`, and the checks between sections are
:mod:`exporters.artifacts.manifest_checks`.

The digest and byte form are checked apart, before this runs
(:mod:`exporters.artifacts.manifest_integrity`). A format 1 manifest's dense transform is read as
not known, since format 1 wrote ``"log3"`` whatever the data was.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compress.data.dense_transform import DENSE_TRANSFORMS, FORMULAS
from compress.errors import ArtifactError
from compress.io.dlrm_classes import known_classes, strategy_for
from compress.io.model_spec import DLRMSpec, TableSpec
from exporters.artifacts.confined_paths import path_problem
from exporters.artifacts.json_fields import (
    BOOL,
    LIST,
    NAME,
    NONNEG_INT,
    NONNEG_NUMBER,
    OBJ,
    POS_INT,
    SHA256,
    STR,
    JsonObject,
    Problems,
    is_int,
    show,
)
from exporters.artifacts.manifest_checks import (
    check_files_listed,
    check_onnx_features,
    check_tables_cover_model,
)
from exporters.artifacts.manifest_schema import (
    DIGEST_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    MIN_FORMAT_VERSION,
    UNKNOWN_TRANSFORM,
    DenseTransformEntry,
    FileEntry,
    Manifest,
    ManifestError,
    QualityGateEntry,
)
from exporters.artifacts.manifest_storage import (
    parse_dense,
    parse_onnx,
    parse_shared_arrays,
    parse_tables,
)


def check_header(obj: Mapping[str, Any], where: str) -> int:
    """The ``format_version`` of a manifest object this tool reads; :class:`ArtifactError` for
    another format, a malformed version or a newer one."""
    if obj.get("format") != FORMAT_NAME:
        raise ArtifactError(
            f"{where}: not a dqrm-compress manifest (format is not {FORMAT_NAME!r})"
        )
    version = obj.get("format_version")
    if not is_int(version):
        raise ArtifactError(f"{where}: format_version missing or not an integer")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: made by a newer dqrm-compress (format_version {version}, this tool reads up "
            f"to {FORMAT_VERSION}): upgrade dqrm-compress to read it"
        )
    if version < MIN_FORMAT_VERSION:
        raise ArtifactError(f"{where}: format_version {version} was never written by dqrm-compress")
    return version


def parse_manifest(obj: Any, where: str | Path = MANIFEST, *, complete: bool = True) -> Manifest:
    """The :class:`Manifest` of the JSON object ``obj`` or :class:`ManifestError` listing every
    problem (``where`` names the file in each line). ``complete=False`` accepts a manifest still
    being written (no ``files`` and no digest yet, as in :func:`exporters.artifacts.write.save`'s
    staging directory). The digest and byte form are checked apart
    (:func:`exporters.artifacts.manifest_integrity.check_integrity`)."""
    where = str(where)
    if not isinstance(obj, dict):
        raise ManifestError([f"{where}: not a dqrm-compress manifest (not a JSON object)"])
    version = check_header(obj, where)
    p = Problems(where)
    top = JsonObject(p, obj, "")
    spec = _parse_model(top, p)
    transform, sparse = _parse_inputs(top, p, spec, version)
    before = len(p.lines)
    tables = parse_tables(top)
    groups = parse_shared_arrays(top, optional=version < 2)
    tables_ok = len(p.lines) == before  # cross-checks only between sections that parsed
    dense = parse_dense(top)
    onnx = parse_onnx(top, version)
    gate = _parse_quality_gate(top, p)
    files = _parse_files(top, p) if complete else {}
    digest = obj.get(DIGEST_KEY) if complete else None
    if spec is not None:
        if tables_ok:
            check_tables_cover_model(p, spec, tables, groups)
        if onnx is not None:
            check_onnx_features(p, spec, onnx)
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
        check_files_listed(p, manifest)
        if p.lines:
            raise ManifestError(p.lines)
    return manifest


def _parse_model(top: JsonObject, p: Problems) -> DLRMSpec | None:
    raw = top.get("model", OBJ)
    if raw is None:
        return None
    m = JsonObject(p, raw, "model")
    model_class = m.one_of("model_class", known_classes())
    dense_in = m.get("dense_in_features", POS_INT)
    tables: list[TableSpec] = []
    for t in m.each("tables"):
        name, rows = t.get("name", NAME), t.get("num_embeddings", POS_INT)
        dim, features = t.get("embedding_dim", POS_INT), t.list_of("feature_names", NAME)
        if features == ():
            t.fail("feature_names", "empty (a table serves at least one feature)")
        if t.ok:
            tables.append(TableSpec(name, rows, dim, features))
    if "tables" in m.value and isinstance(m.value["tables"], list) and not m.value["tables"]:
        m.fail("tables", "empty (a DLRM has at least one embedding table)")
    bottom = m.list_of("dense_arch_layer_sizes", POS_INT)
    over = m.list_of("over_arch_layer_sizes", POS_INT)
    if over == ():
        m.fail("over_arch_layer_sizes", "empty")
    interaction = {  # set for the classes whose interaction uses them
        "dcn_num_layers": m.get("dcn_num_layers", NONNEG_INT, optional=True, nullable=True),
        "dcn_low_rank_dim": m.get("dcn_low_rank_dim", POS_INT, optional=True, nullable=True),
    }
    for key in ("interaction_branch1_layer_sizes", "interaction_branch2_layer_sizes"):
        interaction[key] = m.list_of(key, POS_INT, nullable=True, optional=True)
    if model_class is not None:  # the parameters the class's interaction needs
        strategy = strategy_for(model_class)
        missing = strategy.missing_fields(interaction)
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
    return DLRMSpec(model_class, tuple(tables), dense_in, bottom, over, **interaction)


def _parse_inputs(
    top: JsonObject, p: Problems, spec: DLRMSpec | None, version: int
) -> tuple[DenseTransformEntry | None, dict[str, str] | None]:
    raw = top.get("inputs", OBJ)
    if raw is None:
        return None, None
    inputs = JsonObject(p, raw, "inputs")
    dense = inputs.child("dense")
    dense.one_of("dtype", ("float32",))
    shape = dense.get("shape", LIST)
    if shape is not None and spec is not None and shape != ["batch", spec.dense_in_features]:
        dense.fail("shape", f"expected ['batch', {spec.dense_in_features}], got {show(shape)}")
    transform = _parse_transform(dense, version)
    sparse_raw = inputs.get("sparse", OBJ)
    sparse_obj = JsonObject(p, sparse_raw or {}, "inputs.sparse")
    sparse: dict[str, str] = {}
    for f, raw in sparse_obj.value.items():
        entry = JsonObject(p, raw, f"inputs.sparse.{f}")
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


def _parse_transform(dense: JsonObject, version: int) -> DenseTransformEntry | None:
    if version < 2:  # format 1 wrote "log3" whatever the data was: not a record of anything
        dense.get("transform", STR)
        return DenseTransformEntry(None, None)
    raw = dense.get("transform", OBJ)
    if raw is None:
        return None
    t = JsonObject(dense.problems, raw, "inputs.dense.transform")
    name = t.one_of("name", (*DENSE_TRANSFORMS, UNKNOWN_TRANSFORM))
    formula = t.get("formula", STR, nullable=True)
    if name is not None and t.ok:
        want = FORMULAS.get(name)
        if formula != want:
            t.fail("formula", f"{show(formula)}, transform {name!r} is {show(want)}")
    dense.ok &= t.ok
    if not t.ok:
        return None
    return DenseTransformEntry(None if name == UNKNOWN_TRANSFORM else name, formula)


def _parse_quality_gate(top: JsonObject, p: Problems) -> QualityGateEntry | None:
    """The optional ``quality_gate`` section (absent: no gate was set)."""
    raw = top.get("quality_gate", OBJ, optional=True)
    if raw is None:
        return None
    g = JsonObject(p, raw, "quality_gate")
    limit = g.get("max_auc_drop", NONNEG_NUMBER)
    passed = g.get("passed", BOOL)
    failure = g.get("failure", STR, nullable=True)
    if passed is False and not failure:
        g.fail("failure", "a failed gate says why")
    top.ok &= g.ok
    return QualityGateEntry(float(limit), passed, failure) if g.ok else None


def _parse_files(top: JsonObject, p: Problems) -> dict[str, FileEntry]:
    obj = top.get("files", OBJ)
    out: dict[str, FileEntry] = {}
    for rel, raw in (obj or {}).items():
        path = f"files[{json.dumps(rel)}]"
        problem = path_problem(rel)
        if problem is not None:
            p.add(path, problem)
            continue
        f = JsonObject(p, raw, path)
        sha, nbytes = f.get("sha256", SHA256), f.get("bytes", NONNEG_INT)
        if f.ok:
            out[rel] = FileEntry(rel, sha, nbytes)
    return out
