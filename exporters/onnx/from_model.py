"""Describe a compressed DLRM as a :class:`~exporters.onnx.spec.DLRMGraphSpec` (arrays only).

Two sources give the same spec:

* :func:`graph_spec_from_model`: a converted model from :func:`compress.pipeline.compress`
  (tables from its ``QuantizedEmbeddingBagCollection.quantized``, MLP linears as
  :class:`~compress.methods.qat_linear.QuantizedLinear` or float ``nn.Linear``, DCN cross-net kernels,
  projection branches). A plain TorchRec ``EmbeddingBagCollection`` gives FP32 tables.
* :func:`graph_spec_from_artifacts`: a loaded artifact directory (arrays stay memory-mapped, so a
  model larger than RAM can be described and exported).

Both first reduce every table to a :class:`~exporters.artifacts.read.TableArrays` (layout = the
table's method, arrays by role), then the table's method makes its graph table
(:meth:`compress.methods.registry.TableMethod.graph_table`; a shared array is dequantized to
float32 once per group).

Example::

    gspec = graph_spec_from_artifacts(load_artifacts("out/dlrm.int4_qat"))
    onnx_model = build_full_model(gspec)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compress.errors import ArtifactError
from compress.io.dlrm_classes import strategy_for
from compress.io.dlrm_classes.base import DENSE_GROUP, OVER_GROUP
from compress.io.model_spec import DLRMSpec
from compress.methods import registry
from compress.methods.apply_plan import embedding_parts
from compress.methods.qat_embedding import QuantizedEmbeddingBagCollection
from compress.methods.qat_linear import FakeQuantLinear, QuantizedLinear
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


def _assemble(
    spec: DLRMSpec,
    tables: dict[str, TableArrays],
    linear: Callable[[str], Linear],
    tensor: Callable[[str], np.ndarray],
) -> DLRMGraphSpec:
    lookups = tuple(
        TableLookup(t.name, tuple(t.feature_names), t.embedding_dim, table_kind(tables[t.name]))
        for t in spec.tables
    )
    strategy = strategy_for(spec.model_class)
    groups = {g: tuple(linear(p) for p in paths) for g, paths in linear_paths(spec).items()}
    extra: dict = {g: layers for g, layers in groups.items() if g not in (DENSE_GROUP, OVER_GROUP)}
    cross = strategy.cross_layers(spec)
    if cross:
        extra["crossnet"] = tuple(CrossLayer(*(_f32(tensor(k)) for k in c.keys)) for c in cross)
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


def _f32(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.float32 else np.asarray(a, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# From a converted model


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _part_tables(part: nn.Module) -> dict[str, TableArrays]:
    """The tables one embedding module holds (converted, a sharing group's, or plain TorchRec
    FP32)."""
    out = {}
    group_method = registry.for_module(part)
    if isinstance(part, QuantizedEmbeddingBagCollection):
        for t in part.tables:
            table = part.quantized[t.name]
            method = registry.for_config(table.config)
            arrays = {role: _np(a) for role, a in table.arrays().items()}
            fields = method.fields(table.config)
            entry = {"method": fields.method, "bits": fields.bits}
            out[t.name] = TableArrays(
                t.name,
                method.name,
                t.num_embeddings,
                t.embedding_dim,
                fields.bits,
                t.feature_names,
                arrays,
                entry,
            )
    elif group_method is not None:
        tables = {t.name: t for t in part.tables}
        for name, (arrays, entry) in group_method.group_tables(part).items():
            t = tables[name]
            out[name] = TableArrays(
                name,
                group_method.name,
                t.num_embeddings,
                t.embedding_dim,
                None,
                t.feature_names,
                arrays,
                entry,
            )
    elif isinstance(part, EmbeddingBagCollection):  # a plain FP32 TorchRec collection
        kept = registry.get(registry.DEFAULT_METHOD)
        for cfg in part.embedding_bag_configs():
            weight = _f32(_np(part.embedding_bags[cfg.name].weight))
            out[cfg.name] = TableArrays(
                cfg.name,
                kept.name,
                cfg.num_embeddings,
                cfg.embedding_dim,
                None,
                tuple(cfg.feature_names),
                {"data": weight},
            )
    else:
        raise ArtifactError(
            f"{type(part).__name__} is not supported by this exporter yet (convert the model first)"
        )
    return out


def table_arrays_from_model(model: nn.Module, spec: DLRMSpec) -> dict[str, TableArrays]:
    """Every table of ``model`` as :class:`TableArrays` (numpy views of the model's tensors)."""
    found: dict[str, TableArrays] = {}
    for part in embedding_parts(model):
        found.update(_part_tables(part))
    missing = [t.name for t in spec.tables if t.name not in found]
    if missing:
        raise ArtifactError(f"the model's embedding modules hold no table {missing}")
    return {t.name: found[t.name] for t in spec.tables}


def linear_from_module(module: nn.Module, where: str) -> Linear:
    """A converted :class:`QuantizedLinear` or float ``nn.Linear`` as a graph :class:`Linear`."""
    if isinstance(module, QuantizedLinear):
        bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
        return Linear(
            bias=_f32(_np(bias)),
            qweight=_np(module.qweight),
            scales=_f32(_np(module.scales)),
            bits=module.bits,
        )
    if isinstance(module, nn.Linear) and not isinstance(module, FakeQuantLinear):
        bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
        return Linear(bias=_f32(_np(bias)), weight=_f32(_np(module.weight)))
    raise ArtifactError(
        f"{where}: {type(module).__name__} is not a converted linear (convert the model first)"
    )


def graph_spec_from_model(model: nn.Module, spec: DLRMSpec) -> DLRMGraphSpec:
    """The graph spec of a converted (or plain FP32) TorchRec DLRM of shape ``spec``."""
    state = dict(model.state_dict(keep_vars=True))

    def tensor(key: str) -> np.ndarray:
        return _np(state[key])

    def linear(path: str) -> Linear:
        return linear_from_module(model.get_submodule(path), path)

    return _assemble(spec, table_arrays_from_model(model, spec), linear, tensor)


# ---------------------------------------------------------------------------------------------
# From an artifact directory


def unpack_int4_weight(packed: np.ndarray, in_features: int) -> np.ndarray:
    """uint8 ``[out, ceil(in/2)]`` codes ``q + 8`` (low nibble first) -> int8 ``[out, in]``."""
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return (codes[:, :in_features].astype(np.int16) - 8).astype(np.int8)


def linear_from_artifacts(arts: Artifacts, path: str) -> Linear:
    """The graph :class:`Linear` stored under module ``path`` (``<path>.qweight`` or ``.weight``)."""
    dense = arts.dense
    try:
        bias = _f32(dense[f"{path}.bias"])
        entry = arts.dense_entries.get(f"{path}.qweight")
        if entry is None:
            return Linear(bias=bias, weight=_f32(dense[f"{path}.weight"]))
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
            scales=_f32(dense[f"{path}.scales"]),
            bits=int(entry["bits"]),
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
        gspec = _assemble(arts.spec, arts.tables, lambda p: linear_from_artifacts(arts, p), tensor)
        return replace(gspec, one_hot_features=one_hot)
    except ArtifactError as e:
        msg = str(e)
        raise ArtifactError(
            msg if msg.startswith(str(arts.path)) else f"{arts.path}: {msg}"
        ) from None
