"""Describe a compressed DLRM as a :class:`~exporters.onnx.spec.DLRMGraphSpec` (arrays only).

Two sources give the same spec:

* :func:`graph_spec_from_model`: a converted model from :func:`compress.pipeline.compress`
  (tables from its ``QuantizedEmbeddingBagCollection.quantized``, MLP linears as
  :class:`~compress.methods.qat_linear.QuantizedLinear` or float ``nn.Linear``, DCN cross-net kernels,
  projection branches). A plain TorchRec ``EmbeddingBagCollection`` gives FP32 tables.
* :func:`graph_spec_from_artifacts`: a loaded artifact directory (arrays stay memory-mapped, so a
  model larger than RAM can be described and exported).

Both first reduce every table to a :class:`~exporters.artifacts.read.TableArrays` (layout name + arrays by
role), then :data:`TABLE_BUILDERS` maps the layout to a table kind: ``fp32``, ``fp16``,
``rowwise``, ``tablewise`` and ``robe`` (parameter sharing, :class:`~exporters.onnx.spec.RobeTable`
over the group's array dequantized to float32). A new layout adds one entry there; a layout
without one is an :class:`~compress.errors.ArtifactError` ("layout X is not supported by this
exporter yet").

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
from compress.io.model_spec import DLRMSpec
from compress.methods.apply_plan import embedding_parts
from compress.methods.qat_embedding import QuantizedEmbeddingBagCollection
from compress.methods.qat_linear import FakeQuantLinear, QuantizedLinear
from compress.methods.robe import RobeEmbeddingBagCollection, table_offsets
from compress.methods.robe_hash import ROBE_PRIME
from exporters.artifacts.read import SHARED_ROLE, Artifacts, TableArrays, load_artifacts
from exporters.artifacts.write import table_layout
from exporters.onnx.spec import (
    CrossLayer,
    DLRMGraphSpec,
    Fp16Table,
    Fp32Table,
    Linear,
    RobeTable,
    RowwiseTable,
    TableKind,
    TableLookup,
    TablewiseTable,
)

TableBuilder = Callable[[TableArrays], TableKind]


def _fp32_table(t: TableArrays) -> TableKind:
    return Fp32Table(t.arrays["data"])


def _fp16_table(t: TableArrays) -> TableKind:
    return Fp16Table(t.arrays["data"])


def _rowwise_table(t: TableArrays) -> TableKind:
    return RowwiseTable(t.arrays["data"], t.arrays["scale"], t.arrays["bias"], int(t.bits))


def _tablewise_table(t: TableArrays) -> TableKind:
    return TablewiseTable(t.arrays["data"], float(np.asarray(t.arrays["scale"])), int(t.bits))


def dequantize_shared(data: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """A stored shared array as the float32 values the model reads (``compress.methods.robe``'s
    ``dequantize_array``: fp16 cast, int8 ``q * scale`` in float32, one scale per array)."""
    if data.dtype == np.float32:
        return data
    if data.dtype == np.float16:
        return data.astype(np.float32)
    if scale is None or scale.size != 1:
        raise ArtifactError(
            f"shared int8 array needs exactly one scale, got {None if scale is None else scale.size}"
        )
    return data.astype(np.float32) * np.float32(scale.reshape(()))


def _robe_table(t: TableArrays) -> TableKind:
    group = t.entry["shared"]
    return RobeTable(
        array=dequantize_shared(
            t.arrays[SHARED_ROLE + "data"], t.arrays.get(SHARED_ROLE + "scale")
        ),
        num_rows=t.num_embeddings,
        block_size=int(group["block_size"]),
        table_offset=int(t.entry["table_offset"]),
        seeds=tuple(int(c) for c in group["constants"]),
        prime=int(group["prime"]),
        array_name=str(group["name"]),
    )


#: Manifest table layout -> graph table kind. One entry per layout (see the module docstring).
TABLE_BUILDERS: dict[str, TableBuilder] = {
    "fp32": _fp32_table,
    "fp16": _fp16_table,
    "rowwise": _rowwise_table,
    "tablewise": _tablewise_table,
    "robe": _robe_table,
}


def table_kind(table: TableArrays) -> TableKind:
    """The graph table kind of one stored table; unknown layouts are an :class:`ArtifactError`."""
    builder = TABLE_BUILDERS.get(table.layout)
    if builder is None:
        raise ArtifactError(
            f"table {table.name!r}: layout {table.layout!r} is not supported by this exporter yet "
            f"(supported: {', '.join(TABLE_BUILDERS)})"
        )
    try:
        return builder(table)
    except KeyError as e:
        raise ArtifactError(
            f"table {table.name!r}: layout {table.layout!r} needs array {e}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Module paths of a TorchRec DLRM's linears (the same names as the state dict / manifest keys)


def linear_paths(spec: DLRMSpec) -> dict[str, list[str]]:
    """``{"dense_arch" | "over_arch" | "branch1" | "branch2": [module path, ...]}`` in layer order."""
    paths = {
        "dense_arch": [
            f"dense_arch.model._mlp.{i}._linear" for i in range(len(spec.dense_arch_layer_sizes))
        ],
        "over_arch": [
            *(
                f"over_arch.model.0._mlp.{i}._linear"
                for i in range(len(spec.over_arch_layer_sizes) - 1)
            ),
            "over_arch.model.1",
        ],
    }
    if spec.model_class == "DLRM_Projection":
        for k, sizes in (
            (1, spec.interaction_branch1_layer_sizes),
            (2, spec.interaction_branch2_layer_sizes),
        ):
            paths[f"branch{k}"] = [
                f"inter_arch.interaction_branch{k}.model._mlp.{i}._linear"
                for i in range(len(sizes or ()))
            ]
    return paths


def crossnet_keys(layer: int) -> tuple[str, str, str]:
    """State-dict keys of one DCN layer: ``W_kernels``, ``V_kernels``, ``bias``."""
    return tuple(f"inter_arch.crossnet.{k}.{layer}" for k in ("W_kernels", "V_kernels", "bias"))


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
    paths = linear_paths(spec)
    extra: dict = {}
    if spec.model_class == "DLRM_DCN":
        extra["crossnet"] = tuple(
            CrossLayer(*(_f32(tensor(k)) for k in crossnet_keys(i)))
            for i in range(spec.dcn_num_layers or 0)
        )
    elif spec.model_class == "DLRM_Projection":
        extra["branch1"] = tuple(linear(p) for p in paths["branch1"])
        extra["branch2"] = tuple(linear(p) for p in paths["branch2"])
    gspec = DLRMGraphSpec(
        model_class=spec.model_class,
        dense_in_features=spec.dense_in_features,
        features=spec.feature_names,
        tables=lookups,
        dense_arch=tuple(linear(p) for p in paths["dense_arch"]),
        over_arch=tuple(linear(p) for p in paths["over_arch"]),
        **extra,
    )
    try:
        gspec.validate()
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
    """The tables one embedding module holds (converted, shared, or plain TorchRec FP32)."""
    out = {}
    if isinstance(part, QuantizedEmbeddingBagCollection):
        for t in part.tables:
            q = part.quantized[t.name]
            arrays = {"data": _np(q.data)}
            arrays.update(
                {k: _np(v) for k, v in (("scale", q.scale), ("bias", q.bias)) if v is not None}
            )
            layout = table_layout(q.quant.method, q.quant.granularity)
            out[t.name] = TableArrays(
                t.name,
                layout,
                t.num_embeddings,
                t.embedding_dim,
                q.quant.bits,
                t.feature_names,
                arrays,
            )
    elif isinstance(part, RobeEmbeddingBagCollection):
        array = _np(part.dequantized_array())  # one object: the graph stores it once
        c = part.config
        group = {
            "name": f"shared_{part.tables[0].name}",
            "block_size": c.block_size,
            "prime": ROBE_PRIME,
            "constants": list(part.constants),
            "cells": c.array_size,
        }
        for t, offset in zip(part.tables, table_offsets(part.tables), strict=True):
            out[t.name] = TableArrays(
                t.name,
                "robe",
                t.num_embeddings,
                t.embedding_dim,
                None,
                t.feature_names,
                {SHARED_ROLE + "data": array},
                {"table_offset": offset, "shared": group},
            )
    elif isinstance(part, EmbeddingBagCollection):  # a plain FP32 TorchRec collection
        for cfg in part.embedding_bag_configs():
            weight = _f32(_np(part.embedding_bags[cfg.name].weight))
            out[cfg.name] = TableArrays(
                cfg.name,
                "fp32",
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
