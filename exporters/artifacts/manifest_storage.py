"""Parsers of the manifest sections that describe stored files: tables, shared arrays, dense
tensors, ONNX graphs and their parity data.

Each reads its section of the top-level :class:`~exporters.artifacts.json_fields.JsonObject`,
records every problem with its JSON path, and returns the typed entries
(:mod:`exporters.artifacts.manifest_schema`) of the items that parsed. A table entry's ``layout``
is the registered name of its method (:mod:`compress.methods.registry`), which says what the
entry holds: the roles of its files, the code widths of packed codes, and whether it reads a
shared array (then ``group`` and ``table_offset``, and ``shared_arrays`` entries whose dtypes and
hash parameters that method checks). Every file is named by a confined relative path
(:data:`exporters.artifacts.confined_paths.PATH`).
"""

from __future__ import annotations

from compress.methods import registry
from exporters.artifacts.confined_paths import PATH
from exporters.artifacts.json_fields import (
    NAME,
    NONNEG_INT,
    OBJ,
    POS_INT,
    STR,
    JsonObject,
    show,
)
from exporters.artifacts.manifest_schema import (
    DENSE_LAYOUT_BITS,
    FORMAT_VERSION,
    GRAPHS_READ_TABLES_VERSION,
    DenseEntry,
    OnnxEntry,
    OnnxGraphEntry,
    SharedGroupEntry,
    TableEntry,
)


def parse_tables(top: JsonObject) -> list[TableEntry]:
    """The ``tables`` entries, each checked by the method its ``layout`` names (file roles, code
    widths, and the shared array it reads)."""
    out = []
    for t in top.each("tables"):
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
        files = _role_files(t, "files", method.file_roles() if method is not None else None)
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
                    layout=layout,
                    files=files,
                    group=group,
                    table_offset=offset,
                    raw=t.value,
                    **values,
                )
            )
    return out


def parse_shared_arrays(top: JsonObject, optional: bool) -> list[SharedGroupEntry]:
    """The ``shared_arrays`` entries, whose dtypes, files and hash parameters the method that
    shares arrays checks (:func:`compress.methods.registry.sharing_method`)."""
    out = []
    sharing = registry.sharing_method()
    for g in top.each("shared_arrays", optional=optional):
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
        problem = sharing.group_entry_problem(g.value) if dtype is not None else None
        if problem is not None:
            g.fail(*problem)
        roles = (
            frozenset(sharing.group_arrays(dtype, 1, g.value))
            if dtype is not None and problem is None
            else None
        )
        files = _role_files(g, "files", roles)
        if g.ok:
            problem = sharing.group_hash_problem(
                name, values["seed"], values["constants"], values["prime"]
            )
            if problem is not None:
                g.fail(*problem)
        if g.ok:
            values["constants"] = tuple(values["constants"])
            out.append(SharedGroupEntry(dtype=dtype, files=files, raw=g.value, **values))
    return out


def parse_dense(top: JsonObject) -> list[DenseEntry]:
    """The ``dense`` entries: state-dict keys listed once, quantized weights ``[out, in]`` at the
    width their layout holds."""
    out = []
    keys: set[str] = set()
    for d in top.each("dense"):
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
            out.append(DenseEntry(key, shape, file, nbytes, layout, bits, raw=d.value))
    return out


def parse_onnx(top: JsonObject, version: int = FORMAT_VERSION) -> OnnxEntry | None:
    """The optional ``onnx`` section (``None`` when absent or null) of a manifest of format
    ``version``: graphs with the files they read and the full model's feature inputs, session
    entries, export hints and stored parity data."""
    raw = top.get("onnx", OBJ, optional=True, nullable=True)
    if raw is None:
        return None
    o = JsonObject(top.problems, raw, "onnx")
    graphs_obj = o.child("graphs")
    graphs: dict[str, OnnxGraphEntry] = {}
    for name, graw in graphs_obj.value.items():
        g = JsonObject(top.problems, graw, f"onnx.graphs.{name}")
        file = g.get("file", PATH)
        external = _graph_data_files(g, version)
        features: dict[str, tuple[str, str]] = {}
        if name == "model":
            for f, io in (g.get("features", OBJ) or {}).items():
                fi = JsonObject(top.problems, io, f"onnx.graphs.model.features.{f}")
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
            o.fail(f"session_config.{k}", f"expected a string, got {show(v)}")
    export = o.child("export", optional=True)
    one_hot = export.list_of("one_hot_features", NAME, optional=True) or ()
    parity_files = _parse_parity_files(o)
    o.ok &= graphs_obj.ok and export.ok
    top.ok &= o.ok
    if not o.ok:
        return None
    return OnnxEntry(graphs, dict(session), tuple(one_hot), raw=raw, parity_files=parity_files)


def _graph_data_files(g: JsonObject, version: int) -> tuple[str, ...]:
    """``external_data`` of a graph entry: from format 3 a list of distinct files (the table files
    the graph reads in place and at most one ``.data`` file), before it a path or null."""
    if version < GRAPHS_READ_TABLES_VERSION:
        one = g.get("external_data", PATH, nullable=True)
        return () if one is None else (one,)
    files = g.list_of("external_data", PATH) or ()
    if len(set(files)) != len(files):
        g.fail("external_data", "lists a file twice")
    return tuple(files)


def _parse_parity_files(o: JsonObject) -> tuple[str, ...]:
    """Paths of ``onnx.parity.reference_data.<set>.inputs.<name>`` and ``.logits`` (optional:
    absent in directories exported before ``verify --parity``)."""
    parity = o.child("parity", optional=True)
    stored = parity.get("reference_data", OBJ, optional=True) or {}
    out: list[str] = []
    for set_name, raw in stored.items():
        entry = JsonObject(o.problems, raw, parity.at(f"reference_data.{set_name}"))
        inputs = entry.child("inputs")
        out += [inputs.get(name, PATH) for name in inputs.value]
        out.append(entry.get("logits", PATH))
        o.ok &= entry.ok and inputs.ok
    o.ok &= parity.ok
    return tuple(out) if o.ok else ()


def _role_files(entry: JsonObject, key: str, roles: frozenset[str] | None) -> dict[str, str] | None:
    """``{role: path}`` of ``entry[key]``; with ``roles``, exactly those roles."""
    obj = entry.get(key, OBJ)
    if obj is None:
        return None
    sub = JsonObject(entry.problems, obj, entry.at(key))
    out = {role: sub.get(role, PATH) for role in obj}
    if roles is not None and set(obj) != roles:
        sub.fail("", f"roles {sorted(obj)}, expected {sorted(roles)}")
    entry.ok &= sub.ok
    return out if sub.ok else None
