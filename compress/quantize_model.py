"""Apply a plan to a TorchRec DLRM: prepare (fake-quant modules) and convert (integer modules).

``prepare_model`` copies the model and swaps in :class:`~compress.qat_embedding.QATEmbeddingBagCollection`
for the tables and :class:`~compress.qat_linear.FakeQuantLinear` (QAT) or
:class:`~compress.qat_linear.QuantizedLinear` (PTQ) for the MLP linears. ``convert_model`` turns the
prepared model into one that holds only integers and scales. QAT and PTQ share the quantizers in
:mod:`compress.quant_math`, so convert gives exactly what the fine-tuned model computed.
"""

from __future__ import annotations

import copy

from torch import nn

from compress.plan import Plan
from compress.qat_embedding import (
    QATEmbeddingBagCollection,
    QuantizedEmbeddingBagCollection,
    TableQuant,
)
from compress.qat_linear import FakeQuantLinear, QuantizedLinear, swap_linears
from compress.spec import DLRMSpec


def table_quants(plan: Plan) -> dict[str, TableQuant]:
    """The per-table settings of ``plan`` for the embedding modules."""
    return {
        t.name: TableQuant(t.method, t.bits, t.granularity, t.scale_refresh or 200)
        for t in plan.tables
    }


def prepare_model(model: nn.Module, spec: DLRMSpec, plan: Plan) -> nn.Module:
    """A copy of ``model`` ready for fine-tuning under ``plan`` (``model`` is left untouched)."""
    unsupported = sorted({t.method for t in plan.tables} - {"keep", "fp16", "ptq", "qat"})
    if unsupported:
        raise NotImplementedError(f"table method(s) {unsupported} are not built yet")
    ebc = model.sparse_arch.embedding_bag_collection
    student = _copy_without(model, "sparse_arch.embedding_bag_collection")
    weights = {t.name: ebc.embedding_bags[t.name].weight.detach().clone() for t in spec.tables}
    student.sparse_arch.embedding_bag_collection = QATEmbeddingBagCollection(
        list(spec.tables), weights, table_quants(plan)
    )
    mlp = plan.mlp
    if mlp.method == "qat":
        swap_linears(student, lambda lin: FakeQuantLinear.from_float(lin, mlp.bits))
    elif mlp.method == "ptq":
        swap_linears(student, lambda lin: QuantizedLinear.from_float(lin, mlp.bits))
    return student


def convert_model(prepared: nn.Module) -> nn.Module:
    """Replace fake-quant modules of a prepared model with integer ones (in place; returns it)."""
    qat = prepared.sparse_arch.embedding_bag_collection
    prepared.sparse_arch.embedding_bag_collection = QuantizedEmbeddingBagCollection.from_qat(qat)
    swap_linears(
        prepared,
        lambda lin: QuantizedLinear.from_float(lin, lin.bits) if isinstance(lin, FakeQuantLinear) else lin,
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
