"""Describe a stored artifact directory as a :class:`~exporters.onnx.spec.DLRMGraphSpec`.

:func:`graph_spec_from_artifacts` reads a loaded artifact directory (arrays stay memory-mapped, so
a model larger than RAM can be described and exported): every table is a
:class:`~exporters.artifacts.read.TableArrays` (layout = the table's method, arrays by role) that
its method turns into a graph table (:meth:`compress.methods.registry.TableMethod.graph_table`),
every MLP linear a graph :class:`~exporters.onnx.spec.Linear` (INT4 weights unpacked). The same
assembly (:func:`assemble_graph_spec`) describes a converted PyTorch model
(:mod:`exporters.onnx.from_model`). Only numpy and the graph dataclasses are imported, neither
torch nor onnx (the builders import onnx when they build): ``verify`` and
:class:`~exporters.runtime.predictor.Predictor` run this without either.

Example::

    gspec = graph_spec_from_artifacts(load_artifacts("out/dlrm.int4_qat"))
    onnx_model = build_full_model(gspec)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from compress.errors import ArtifactError
from compress.io.dlrm_classes import strategy_for
from compress.io.dlrm_classes.base import DENSE_GROUP, OVER_GROUP
from compress.io.model_spec import DLRMSpec
from compress.methods import registry
from exporters.artifacts.read import Artifacts, TableArrays, load_artifacts
from exporters.onnx.dense import validate_graph
from exporters.onnx.spec import CrossLayer, DLRMGraphSpec, GraphTable, Linear, TableLookup


def table_kind(table: TableArrays) -> GraphTable:
    """The graph table of one stored table, made by its method; an unknown layout or a missing
    array is an :class:`ArtifactError`."""
    try:
        method = registry.get(table.layout)
    except KeyError:
        raise ArtifactError(
            f"table {table.name!r}: layout {table.layout!r} is not supported by this exporter yet "
            f"(supported: {', '.join(registry.names())})"
        ) from None
    try:
        return method.graph_table(table)
    except KeyError as e:
        raise ArtifactError(
            f"table {table.name!r}: layout {table.layout!r} needs array {e}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Module paths of a TorchRec DLRM's linears (the same names as the state dict / manifest keys)


def linear_paths(spec: DLRMSpec) -> dict[str, list[str]]:
    """``{group: [module path, ...]}`` in layer order: ``dense_arch``, the interaction's groups
    (``branch1``/``branch2`` of a projection), ``over_arch``, as the class's strategy lays them out
    (:meth:`compress.io.dlrm_classes.base.DLRMClass.linear_groups`)."""
    groups = strategy_for(spec.model_class).linear_groups(spec)
    return {group: [layer.name for layer in layers] for group, layers in groups.items()}


def assemble_graph_spec(
    spec: DLRMSpec,
    tables: dict[str, TableArrays],
    linear: Callable[[str], Linear],
    tensor: Callable[[str], np.ndarray],
) -> DLRMGraphSpec:
    """The graph spec of a model of shape ``spec`` from its tables, ``linear(module path)`` and
    ``tensor(state-dict key)`` (cross-layer kernels); :class:`ArtifactError` when it is not a
    valid graph of its class."""
    lookups = tuple(
        TableLookup(t.name, tuple(t.feature_names), t.embedding_dim, table_kind(tables[t.name]))
        for t in spec.tables
    )
    strategy = strategy_for(spec.model_class)
    groups = {g: tuple(linear(p) for p in paths) for g, paths in linear_paths(spec).items()}
    extra: dict = {g: layers for g, layers in groups.items() if g not in (DENSE_GROUP, OVER_GROUP)}
    cross = strategy.cross_layers(spec)
    if cross:
        extra["crossnet"] = tuple(
            CrossLayer(*(as_float32(tensor(k)) for k in c.keys)) for c in cross
        )
    gspec = DLRMGraphSpec(
        model_class=spec.model_class,
        dense_in_features=spec.dense_in_features,
        features=spec.feature_names,
        tables=lookups,
        dense_arch=groups[DENSE_GROUP],
        over_arch=groups[OVER_GROUP],
        **extra,
    )
    try:
        validate_graph(gspec)
    except ValueError as e:
        raise ArtifactError(
            f"model does not describe a valid {spec.model_class} graph: {e}"
        ) from None
    return gspec


def as_float32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 (itself when it is already)."""
    return a if a.dtype == np.float32 else np.asarray(a, dtype=np.float32)


def unpack_int4_weight(packed: np.ndarray, in_features: int) -> np.ndarray:
    """uint8 ``[out, ceil(in/2)]`` codes ``q + 8`` (low nibble first) -> int8 ``[out, in]``."""
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return (codes[:, :in_features].astype(np.int16) - 8).astype(np.int8)


#: State-dict leaves (under a linear's path) of its INT8 activation scale and zero point
#: (:class:`compress.methods.qat_linear.ActivationQuantizer`, attribute ``input_quant``).
ACT_SCALE = "input_quant.scale"
ACT_ZERO_POINT = "input_quant.zero_point"


def linear_from_artifacts(arts: Artifacts, path: str) -> Linear:
    """The graph :class:`Linear` stored under module ``path`` (``<path>.qweight`` or ``.weight``;
    with INT8 activations also ``<path>.input_quant.scale`` and ``.zero_point``)."""
    dense = arts.dense
    try:
        bias = as_float32(dense[f"{path}.bias"])
        act = {}
        if f"{path}.{ACT_SCALE}" in dense or f"{path}.{ACT_ZERO_POINT}" in dense:
            act = {  # INT8 activations: both scalars (a missing one is a KeyError below)
                "act_scale": np.asarray(dense[f"{path}.{ACT_SCALE}"], np.float32),
                "act_zero_point": np.asarray(dense[f"{path}.{ACT_ZERO_POINT}"], np.float32),
            }
        entry = arts.dense_entries.get(f"{path}.qweight")
        if entry is None:  # float weights (INT8 activations here fail the layer's validation)
            return Linear(bias=bias, weight=as_float32(dense[f"{path}.weight"]), **act)
        stored = dense[f"{path}.qweight"]
        if entry.get("layout") == "int4_offset_packed":
            qweight = unpack_int4_weight(np.asarray(stored), int(entry["shape"][1]))
        elif entry.get("layout") == "int8":
            qweight = np.asarray(stored)
        else:
            raise ArtifactError(
                f"{arts.path}: {path}.qweight has unknown layout {entry.get('layout')!r}"
            )
        return Linear(
            bias=bias,
            qweight=qweight,
            scales=as_float32(dense[f"{path}.scales"]),
            bits=int(entry["bits"]),
            **act,
        )
    except KeyError as e:
        raise ArtifactError(f"{arts.path}: no dense weight {e.args[0]!r} in the manifest") from None


def graph_spec_from_artifacts(artifacts: Artifacts | str | Path) -> DLRMGraphSpec:
    """The graph spec of a loaded (or, given a path, freshly loaded and verified) artifact dir,
    with the one-hot layout hint its ONNX export recorded (none without graphs)."""
    arts = artifacts if isinstance(artifacts, Artifacts) else load_artifacts(artifacts)
    one_hot = frozenset(((arts.onnx or {}).get("export") or {}).get("one_hot_features") or ())

    def tensor(key: str) -> np.ndarray:
        if key not in arts.dense:
            raise ArtifactError(f"{arts.path}: no dense weight {key!r} in the manifest")
        return arts.dense[key]

    try:
        gspec = assemble_graph_spec(
            arts.spec, arts.tables, lambda p: linear_from_artifacts(arts, p), tensor
        )
        return replace(gspec, one_hot_features=one_hot)
    except ArtifactError as e:
        msg = str(e)
        raise ArtifactError(
            msg if msg.startswith(str(arts.path)) else f"{arts.path}: {msg}"
        ) from None
