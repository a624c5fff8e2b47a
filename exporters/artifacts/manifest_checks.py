"""Checks between the sections of a parsed manifest: the model, its stored tables, the ONNX
graph's features and the checksummed files agree.

:func:`~exporters.artifacts.manifest_parse.parse_manifest` runs these after every section parsed
on its own, adding one line per disagreement to the same
:class:`~exporters.artifacts.json_fields.Problems`: every model table stored exactly once with the
model's shape and features, every table of a method that shares arrays at its place in its
group, the full graph reading exactly the model's features, and every file a section uses listed
with a checksum.
"""

from __future__ import annotations

from compress.io.model_spec import DLRMSpec
from compress.methods import registry
from exporters.artifacts.json_fields import Problems, show
from exporters.artifacts.manifest_schema import Manifest, OnnxEntry, SharedGroupEntry, TableEntry


def check_tables_cover_model(
    p: Problems, spec: DLRMSpec, tables: list[TableEntry], groups: list[SharedGroupEntry]
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
                    f"{show(list(got) if isinstance(got, tuple) else got)}, the model section "
                    f"says {show(list(getattr(s, key)) if key == 'feature_names' else getattr(s, key))}",
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


def check_onnx_features(p: Problems, spec: DLRMSpec, onnx: OnnxEntry) -> None:
    """The full model's graph reads exactly the model's features; the one-hot hint names only
    features of the model."""
    model = onnx.graphs.get("model")
    if model is not None and set(model.features) != set(spec.feature_names):
        p.add(
            "onnx.graphs.model.features",
            f"features {sorted(model.features)}, the model has {sorted(spec.feature_names)}",
        )
    unknown = sorted(set(onnx.one_hot_features) - set(spec.feature_names))
    if unknown:
        p.add("onnx.export.one_hot_features", f"not features of the model: {unknown}")


def check_files_listed(p: Problems, manifest: Manifest) -> None:
    """Every file a section uses has a checksum entry in ``files``."""
    for rel in manifest.referenced_files():
        if rel not in manifest.files:
            p.add("files", f"{rel!r} is used by the manifest but has no checksum entry")
