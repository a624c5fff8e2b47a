"""Describe a converted PyTorch DLRM as a :class:`~exporters.onnx.spec.DLRMGraphSpec` (arrays only).

Two sources give the same spec:

* :func:`graph_spec_from_model` (here): a converted model from :func:`compress.pipeline.compress`
  (tables from its ``QuantizedEmbeddingBagCollection.quantized``, MLP linears as
  :class:`~compress.methods.qat_linear.QuantizedLinear` or float ``nn.Linear``, DCN cross-net kernels,
  projection branches). A plain TorchRec ``EmbeddingBagCollection`` gives FP32 tables.
* :func:`~exporters.onnx.from_artifacts.graph_spec_from_artifacts`: a loaded artifact directory
  (arrays stay memory-mapped, so a model larger than RAM can be described and exported). It lives
  in :mod:`exporters.onnx.from_artifacts` (no torch) and is importable from here too.

Both first reduce every table to a :class:`~exporters.artifacts.read.TableArrays` (layout = the
table's method, arrays by role), then the table's method makes its graph table
(:meth:`compress.methods.registry.TableMethod.graph_table`; a shared array is dequantized to
float32 once per group), and both assemble the spec with
:func:`~exporters.onnx.from_artifacts.assemble_graph_spec`.

Example::

    gspec = graph_spec_from_model(result.model, result.spec)
    onnx_model = build_full_model(gspec)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compress.errors import ArtifactError
from compress.io.model_spec import DLRMSpec
from compress.methods import registry
from compress.methods.apply_plan import embedding_parts
from compress.methods.qat_embedding import QuantizedEmbeddingBagCollection
from compress.methods.qat_linear import FakeQuantLinear, QuantizedLinear
from exporters.artifacts.read import TableArrays
from exporters.onnx.from_artifacts import (  # the artifact side, importable from here too
    as_float32,
    assemble_graph_spec,
    graph_spec_from_artifacts,
    linear_from_artifacts,
    linear_paths,
    table_kind,
)
from exporters.onnx.spec import DLRMGraphSpec, Linear

__all__ = [
    "graph_spec_from_artifacts",
    "graph_spec_from_model",
    "linear_from_artifacts",
    "linear_from_module",
    "linear_paths",
    "table_arrays_from_model",
    "table_kind",
]


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
            weight = as_float32(_np(part.embedding_bags[cfg.name].weight))
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
        quant = module.input_quant
        return Linear(
            bias=as_float32(_np(bias)),
            qweight=_np(module.qweight),
            scales=as_float32(_np(module.scales)),
            bits=module.bits,
            act_scale=None if quant is None else as_float32(_np(quant.scale)),
            act_zero_point=None if quant is None else as_float32(_np(quant.zero_point)),
        )
    if isinstance(module, nn.Linear) and not isinstance(module, FakeQuantLinear):
        bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
        return Linear(bias=as_float32(_np(bias)), weight=as_float32(_np(module.weight)))
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

    return assemble_graph_spec(spec, table_arrays_from_model(model, spec), linear, tensor)
