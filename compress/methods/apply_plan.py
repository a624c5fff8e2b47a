"""Apply a plan to a TorchRec DLRM: prepare (fake-quant / shared modules) and convert (integers).

``prepare_model`` copies the model and swaps in :class:`~compress.methods.qat_embedding.QATEmbeddingBagCollection`
for the tables it quantizes or keeps, one :class:`~compress.methods.robe.RobeEmbeddingBagCollection` per
parameter-sharing group (its array initialised by the least-squares projection of the trained
tables, :mod:`compress.methods.robe_projection`), and :class:`~compress.methods.qat_linear.FakeQuantLinear` (QAT) or
:class:`~compress.methods.qat_linear.QuantizedLinear` (PTQ) for the MLP linears. With shared tables the
sparse arch holds a :class:`~compress.methods.robe.CombinedEmbeddingBagCollection` of those parts.

``convert_model`` turns the prepared model into one that holds only integers and scales (and the
shared arrays at their stored precision). QAT and PTQ share the quantizers in
:mod:`compress.quant.math`, so convert gives exactly what the fine-tuned model computed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from compress.io.model_spec import DLRMSpec
from compress.methods.qat_embedding import (
    QATEmbeddingBagCollection,
    QuantizedEmbeddingBagCollection,
    TableQuant,
)
from compress.methods.qat_linear import FakeQuantLinear, QuantizedLinear, swap_linears
from compress.methods.robe import (
    ArrayQuantization,
    CombinedEmbeddingBagCollection,
    RobeConfig,
    RobeEmbeddingBagCollection,
)
from compress.methods.robe_hash import DEFAULT_SEED
from compress.methods.robe_projection import ProjectionReport, project_module
from compress.plan import Plan
from compress.train.config import DEFAULT_SCALE_REFRESH

#: Shared arrays up to 4 MB (fp32) take dense gradients.
DENSE_GRAD_MAX_CELLS = 1 << 20


@dataclass
class SharedGroup:
    """A parameter-sharing group as prepared: its module and how its array was initialised."""

    name: str
    module: RobeEmbeddingBagCollection
    report: ProjectionReport
    projection: str


def table_quants(plan: Plan) -> dict[str, TableQuant]:
    """The per-table settings of ``plan`` for the embedding modules."""
    return {
        t.name: TableQuant(
            t.method, t.bits, t.granularity, t.scale_refresh or DEFAULT_SCALE_REFRESH
        )
        for t in plan.tables
        if t.method != "share"
    }


def prepare_model(
    model: nn.Module,
    spec: DLRMSpec,
    plan: Plan,
    row_counts: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, list[SharedGroup]]:
    """A copy of ``model`` ready for fine-tuning under ``plan`` (``model`` is left untouched).

    ``row_counts`` (table name -> ``[rows]`` occurrence counts from the training data) weight the
    projection of shared groups whose recipe asks for ``projection = "frequency"``.
    """
    unsupported = sorted({t.method for t in plan.tables} - {"keep", "fp16", "ptq", "qat", "share"})
    if unsupported:
        raise NotImplementedError(f"table method(s) {unsupported} are not built yet")
    ebc = model.sparse_arch.embedding_bag_collection
    student = _copy_without(model, "sparse_arch.embedding_bag_collection")
    shared_names = {n for g in plan.share_groups for n in g.tables}
    own = [t for t in spec.tables if t.name not in shared_names]
    parts: list[nn.Module] = []
    if own:
        weights = {t.name: ebc.embedding_bags[t.name].weight.detach().clone() for t in own}
        parts.append(QATEmbeddingBagCollection(own, weights, table_quants(plan)))
    groups = [_prepare_group(g, spec, ebc, row_counts) for g in plan.share_groups]
    parts += [g.module for g in groups]
    student.sparse_arch.embedding_bag_collection = (
        parts[0]
        if len(parts) == 1 and not groups
        else CombinedEmbeddingBagCollection(parts, spec.feature_names)
    )
    mlp = plan.mlp
    if mlp.method == "qat":
        swap_linears(student, lambda lin: FakeQuantLinear.from_float(lin, mlp.bits))
    elif mlp.method == "ptq":
        swap_linears(student, lambda lin: QuantizedLinear.from_float(lin, mlp.bits))
    return student, groups


def _prepare_group(group, spec: DLRMSpec, ebc: nn.Module, row_counts) -> SharedGroup:
    tables = [spec.table(n) for n in group.tables]
    weighted = group.projection == "frequency" and row_counts is not None
    pairs = [(t, ebc.embedding_bags[t.name].weight.detach()) for t in tables]
    weights = [row_counts[t.name].double() for t in tables] if weighted else None
    config = RobeConfig(array_size=group.cells, block_size=group.block_size, seed=DEFAULT_SEED)
    # A small array trains faster with dense gradients (the optimizer step over every cell costs
    # less than sparse bookkeeping; the updates are the same): benchmarks/bench_robe.py
    sparse = group.cells > DENSE_GRAD_MAX_CELLS
    module, report = project_module(pairs, config, row_weights=weights, sparse=sparse)
    if group.array_dtype != "fp32":
        module.set_quantization(ArrayQuantization(precision=group.array_dtype))
    return SharedGroup(group.name, module, report, "frequency" if weighted else "mean")


def embedding_parts(model: nn.Module) -> list[nn.Module]:
    """The embedding modules of a prepared or converted model (one, or a combined collection's parts)."""
    ebc = model.sparse_arch.embedding_bag_collection
    return list(ebc.parts) if isinstance(ebc, CombinedEmbeddingBagCollection) else [ebc]


def convert_model(prepared: nn.Module) -> nn.Module:
    """Replace fake-quant modules of a prepared model with integer ones (in place; returns it).

    Shared-array modules stay as they are: their forward already reads the array at its stored
    precision (fp32, or the dequantized fp16/int8 array).
    """
    ebc = prepared.sparse_arch.embedding_bag_collection
    if isinstance(ebc, CombinedEmbeddingBagCollection):
        for i, part in enumerate(ebc.parts):
            if isinstance(part, QATEmbeddingBagCollection):
                ebc.parts[i] = QuantizedEmbeddingBagCollection.from_qat(part)
    else:
        prepared.sparse_arch.embedding_bag_collection = QuantizedEmbeddingBagCollection.from_qat(
            ebc
        )
    swap_linears(
        prepared,
        lambda lin: (
            QuantizedLinear.from_float(lin, lin.bits) if isinstance(lin, FakeQuantLinear) else lin
        ),
    )
    return prepared.eval()


def _copy_without(model: nn.Module, path: str) -> nn.Module:
    """A deep copy of ``model`` with an ``nn.Identity`` placeholder at ``path`` (not copying that
    submodule: the tables are copied table by table instead)."""
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    held = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    try:
        copied = copy.deepcopy(model)
    finally:
        setattr(parent, attr, held)
    return copied
