"""Apply a plan to a TorchRec DLRM: prepare (fake-quant / shared modules) and convert (integers).

``prepare_model`` copies the model (its tables only where fine-tuning updates them) and swaps in,
for the tables stored one by one, a
:class:`~compress.methods.qat_embedding.QATEmbeddingBagCollection` whose per-table modules their
methods make (:meth:`~compress.methods.registry.TableMethod.prepare`), one module per sharing group
(:meth:`~compress.methods.registry.TableMethod.prepare_group`; ROBE-Z initialises its array by
the least-squares projection of the trained tables), and
:class:`~compress.methods.qat_linear.FakeQuantLinear` (QAT) or
:class:`~compress.methods.qat_linear.QuantizedLinear` (PTQ) for the MLP linears. With shared tables
the sparse arch holds a :class:`~compress.methods.combined.CombinedEmbeddingBagCollection` of those
parts.

``convert_model`` turns the prepared model into one that holds only integers and scales (and the
shared arrays at their stored precision). QAT and PTQ share the quantizers in
:mod:`compress.quant`, so convert gives exactly what the fine-tuned model computed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.io.cow_map import cow_copy
from compress.io.model_spec import DLRMSpec
from compress.io.table_stream import copy_rows, progress_bytes
from compress.methods import registry
from compress.methods.base import MethodConfig
from compress.methods.combined import CombinedEmbeddingBagCollection
from compress.methods.qat_embedding import (
    QATEmbeddingBagCollection,
    QuantizedEmbeddingBagCollection,
)
from compress.methods.qat_linear import FakeQuantLinear, QuantizedLinear, swap_linears
from compress.methods.staged_convert import convert_staged
from compress.plan import Plan


def table_configs(plan: Plan, spec: DLRMSpec) -> dict[str, MethodConfig]:
    """The method config each table stored on its own is prepared with
    (:meth:`~compress.methods.registry.TableMethod.stored_config` of its plan's config)."""
    grouped = {n for g in plan.share_groups for n in g.tables}
    return {
        t.name: registry.for_config(t.config).stored_config(t.config, spec.table(t.name))
        for t in plan.tables
        if t.name not in grouped
    }


def prepare_model(
    model: nn.Module,
    spec: DLRMSpec,
    plan: Plan,
    row_counts: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, list[Any]]:
    """A copy of ``model`` ready for fine-tuning under ``plan`` (``model`` is left untouched),
    and the prepared sharing groups (``name``, ``module``, ``notes``, ...).

    Tables that fine-tuning updates are copied (:func:`copy_trained_weights`); the others (every
    table of a plan that does not fine-tune: PTQ, ``keep``, ``fp16``) read ``model``'s own weights,
    which nothing writes, so a memory-mapped checkpoint's tables cost nothing until converted.

    ``row_counts`` (table name -> ``[rows]`` occurrence counts from the training data) weight the
    projection of shared groups whose recipe asks for ``projection = "frequency"``.
    """
    ebc = model.sparse_arch.embedding_bag_collection
    student = _copy_without(model, "sparse_arch.embedding_bag_collection")
    configs = table_configs(plan, spec)
    own = [t for t in spec.tables if t.name in configs]
    parts: list[nn.Module] = []
    if own:
        # the model's own weights (a memory-mapped checkpoint's are not read here); only the
        # tables that fine-tuning updates get a copy of their own (``model`` stays untouched)
        weights = {t.name: ebc.embedding_bags[t.name].weight.detach() for t in own}
        collection = QATEmbeddingBagCollection(own, weights, configs)
        if plan.needs_finetune:
            copy_trained_weights(collection)
        parts.append(collection)
    groups = [
        registry.get(g.method).prepare_group(g, spec, ebc, row_counts) for g in plan.share_groups
    ]
    parts += [g.module for g in groups]
    student.sparse_arch.embedding_bag_collection = (
        parts[0]
        if len(parts) == 1 and not groups
        else CombinedEmbeddingBagCollection(parts, spec.feature_names)
    )
    mlp = plan.mlp
    if mlp.method == "qat":
        swap_linears(
            student, lambda lin: FakeQuantLinear.from_float(lin, mlp.bits, mlp.activations)
        )
    elif mlp.method == "ptq":  # INT8 activations: calibrate_activations before use
        swap_linears(
            student, lambda lin: QuantizedLinear.from_float(lin, mlp.bits, mlp.activations)
        )
    return student, groups


def copy_trained_weights(collection: QATEmbeddingBagCollection) -> list[str]:
    """Give each table of ``collection`` that fine-tuning updates (its weight requires a
    gradient) a copy of its weight in place of the loaded model's; the names of those tables.

    A memory-mapped checkpoint's table gets a copy-on-write map of its bytes in the file
    (:func:`compress.io.cow_map.cow_copy`: it costs only the pages fine-tuning writes, and the
    file is never written); any other table (in memory, or a map that cannot be made) a copy read
    chunk by chunk (:func:`compress.io.table_stream.copy_rows`). The values are the same either
    way. The other tables keep reading the loaded model's weights, which nothing writes: a PTQ,
    ``keep`` or ``fp16`` table of a memory-mapped checkpoint costs no memory of its own until it
    is converted."""
    copied = []
    for name, table in collection.embedding_bags.items():
        if table.weight.requires_grad:
            weight = table.weight.detach()
            mapped = cow_copy(weight)
            table.weight.data = mapped if mapped is not None else copy_rows(weight)
            copied.append(name)
    return copied


def embedding_parts(model: nn.Module) -> list[nn.Module]:
    """The embedding modules of a prepared or converted model (one, or a combined collection's parts)."""
    ebc = model.sparse_arch.embedding_bag_collection
    return list(ebc.parts) if isinstance(ebc, CombinedEmbeddingBagCollection) else [ebc]


def convert_model(prepared: nn.Module, staging_dir: str | Path | None = None) -> nn.Module:
    """Replace fake-quant modules of a prepared model with integer ones (in place; returns it).

    Shared-array modules stay as they are: their forward already reads the array at its stored
    precision (fp32, or the dequantized fp16/int8 array).

    ``staging_dir``: a directory where every table stored on its own is converted into files chunk
    by chunk and then held as memory maps of them
    (:func:`compress.methods.staged_convert.convert_staged`; the same bytes), so that no converted
    table is ever whole in memory; ``None``: converted in memory.
    """
    ebc = prepared.sparse_arch.embedding_bag_collection
    parts = list(ebc.parts) if isinstance(ebc, CombinedEmbeddingBagCollection) else [ebc]
    total = sum(
        m.weight.numel() * m.weight.element_size()
        for part in parts
        if isinstance(part, QATEmbeddingBagCollection)
        for m in part.embedding_bags.values()
        # a kept table is not read in memory, and copied into a file when staged
        if staging_dir is not None or registry.for_config(m.config).changes_tables
    )
    with progress_bytes(total, "convert"):  # every table is read chunk by chunk
        if isinstance(ebc, CombinedEmbeddingBagCollection):
            for i, part in enumerate(ebc.parts):
                if isinstance(part, QATEmbeddingBagCollection):
                    ebc.parts[i] = _convert_collection(part, staging_dir)
        else:
            prepared.sparse_arch.embedding_bag_collection = _convert_collection(ebc, staging_dir)
    swap_linears(
        prepared,
        lambda lin: (
            QuantizedLinear.from_float(lin, lin.bits) if isinstance(lin, FakeQuantLinear) else lin
        ),
    )
    return prepared.eval()


def _convert_collection(
    qat: QATEmbeddingBagCollection, staging_dir: str | Path | None
) -> QuantizedEmbeddingBagCollection:
    """The converted collection of ``qat``: in memory, or staged table by table in
    ``staging_dir``."""
    if staging_dir is None:
        return QuantizedEmbeddingBagCollection.from_qat(qat)
    converted = {
        t.name: convert_staged(qat.embedding_bags[t.name], t.name, staging_dir) for t in qat.tables
    }
    return QuantizedEmbeddingBagCollection(qat.tables, converted)


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
