"""How much each option costs in quality: the log-loss increase on held-out rows when only that
table (or only the MLP) is compressed that way, everything else as in the checkpoint.

Each option is measured in its post-training form, made by the method's own hooks exactly as the
main job makes it: a per-table method prepares the table and converts it
(:meth:`~compress.methods.handler.TableMethod.prepare`, ``convert``; only the rows the slice
reads, for a method that converts rows independently), a sharing method prepares its group from
the trained table (ROBE-Z: the row-frequency weighted projection) and the MLP options swap in
:class:`~compress.methods.qat_linear.QuantizedLinear`. What fine-tuning would recover is not
counted, so a trained option's cost is an upper bound.

Fast because one table changes at a time: the rows are read once (:class:`SliceCache`: the bottom
MLP's output, every feature's pooled embedding, the ids), and an option costs the lookup of the
distinct ids its table sees, their sum pooling, and the interaction and top MLP over the cached
rows. Pooling here is the plain sum of the rows (TorchRec's ``SUM``); the baseline is pooled the
same way, so a kept table's cost is exactly 0.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from compress.budget.options import Option, one_rule_recipe
from compress.io.model_spec import DLRMSpec, TableSpec
from compress.methods import registry
from compress.methods.qat_linear import QuantizedLinear, swap_linears
from compress.methods.staged_convert import RowBlock
from compress.progress import progress

#: Rows of the held-out slice measured, at most (eight batches of 4,096).
DEFAULT_ROWS = 32_768
#: Rows scored at a time through the interaction and top MLP.
CHUNK = 8192
T = TypeVar("T")


@dataclass
class Bag:
    """One feature's ids over the cached rows: ``values`` and the row each belongs to."""

    values: torch.Tensor
    rows: torch.Tensor


@dataclass
class SliceCache:
    """What the scoring of every option shares: raw ``dense`` features, the bottom MLP's output
    ``dense_out``, ``labels``, the baseline pooled embeddings ``sparse`` ``[N, F, D]`` (feature
    ``f`` at ``positions[f]``) and every feature's ids."""

    dense: torch.Tensor
    dense_out: torch.Tensor
    labels: torch.Tensor
    sparse: torch.Tensor
    positions: dict[str, int]
    bags: dict[str, Bag]

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------------------------------
# The rows


def read_rows(
    data, feature_names: tuple[str, ...], max_rows: int, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Bag]]:
    """The first ``max_rows`` rows of ``data`` (in memory or streamed): dense features, labels and
    each feature's ids with their rows."""
    part = data.slice(0, min(len(data), max_rows))
    dense, labels = [], []
    values: dict[str, list[torch.Tensor]] = {f: [] for f in feature_names}
    rows: dict[str, list[torch.Tensor]] = {f: [] for f in feature_names}
    offset = 0
    batches = part.batches(batch_size, feature_names=feature_names)
    with closing(batches):
        for batch in batches:
            n = len(batch)
            dense.append(batch.dense)
            labels.append(batch.labels)
            jagged = batch.sparse.to_dict()
            for f in feature_names:
                lengths = jagged[f].lengths().to(torch.int64)
                values[f].append(jagged[f].values().to(torch.int64))
                rows[f].append(torch.repeat_interleave(torch.arange(offset, offset + n), lengths))
            offset += n
    bags = {f: Bag(_cat(values[f]), _cat(rows[f])) for f in feature_names}
    return torch.cat(dense), torch.cat(labels).float(), bags


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def table_ids(
    bags: dict[str, Bag], table: TableSpec
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The distinct ids of ``table`` in ``bags``, and for each of its features where each of its
    ids is among them."""
    feats = table.feature_names
    joined = torch.cat([bags[f].values for f in feats])
    unique, inverse = torch.unique(joined, return_inverse=True)
    out, start = {}, 0
    for f in feats:
        k = bags[f].values.numel()
        out[f] = inverse[start : start + k]
        start += k
    return unique, out


def pool(rows: torch.Tensor, where: torch.Tensor, bag: Bag, n: int) -> torch.Tensor:
    """Sum pooling ``[n, D]`` of the distinct ``rows`` ``[U, D]`` read at ``where`` by ``bag``."""
    out = torch.zeros(n, rows.shape[1], dtype=torch.float32)
    return out.index_add_(0, bag.rows, rows[where].float())


def sparse_positions(model: nn.Module, spec: DLRMSpec) -> dict[str, int]:
    """Where each feature's pooled embedding sits in the sparse arch's ``[B, F, D]`` output."""
    names = getattr(model.sparse_arch, "sparse_feature_names", None) or spec.feature_names
    return {f: i for i, f in enumerate(names)}


@torch.no_grad()
def cache_slice(model: nn.Module, spec: DLRMSpec, data, max_rows: int = DEFAULT_ROWS) -> SliceCache:
    """Read up to ``max_rows`` rows of ``data`` and what scoring needs of them (the checkpoint's
    bottom MLP output and pooled embeddings)."""
    dense, labels, bags = read_rows(data, spec.feature_names, max_rows)
    n = int(labels.shape[0])
    positions = sparse_positions(model, spec)
    ebc = model.sparse_arch.embedding_bag_collection
    sparse = torch.zeros(n, len(positions), spec.embedding_dim)
    for t in spec.tables:
        unique, where = table_ids(bags, t)
        rows = ebc.embedding_bags[t.name].weight.detach()[unique].float()
        for f in t.feature_names:
            sparse[:, positions[f]] = pool(rows, where[f], bags[f], n)
    dense_out = torch.cat([model.dense_arch(dense[a : a + CHUNK]) for a in range(0, n, CHUNK)])
    return SliceCache(dense, dense_out, labels, sparse, positions, bags)


# --------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def mean_logloss(
    model: nn.Module,
    cache: SliceCache,
    replace: dict[int, torch.Tensor] | None = None,
    dense_out: torch.Tensor | None = None,
) -> float:
    """Mean log loss over the cached rows of ``model``'s interaction and top MLP, with the pooled
    embeddings at ``replace``'s positions and the bottom MLP's output replaced when given."""
    total = 0.0
    dense_out = cache.dense_out if dense_out is None else dense_out
    for a in range(0, cache.n, CHUNK):
        b = min(cache.n, a + CHUNK)
        sparse = cache.sparse[a:b]
        if replace:
            sparse = sparse.clone()
            for pos, pooled in replace.items():
                sparse[:, pos] = pooled[a:b]
        inter = model.inter_arch(dense_features=dense_out[a:b], sparse_features=sparse)
        logits = model.over_arch(inter).reshape(-1)
        total += float(
            F.binary_cross_entropy_with_logits(
                logits.double(), cache.labels[a:b].double(), reduction="sum"
            )
        )
    return total / max(cache.n, 1)


def option_rows(
    option: Option,
    table: TableSpec,
    ids: torch.Tensor,
    spec: DLRMSpec,
    model: nn.Module,
    row_counts: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    """float32 ``[len(ids), D]``: rows ``ids`` of ``table`` as the option stores them after
    training-free compression (see the module docstring)."""
    config = option.config
    method = registry.for_config(config)
    ebc = model.sparse_arch.embedding_bag_collection
    weight = ebc.embedding_bags[table.name].weight.detach()
    group = method.group_name(config, 0)
    if group is not None:
        plan, _ = method.plan_group(one_rule_recipe(table, config), group, [(table, 0)])
        prepared = method.prepare_group(plan, spec, ebc, row_counts)
        return ebc_rows(prepared.module, table, ids)
    stored = method.stored_config(config, table)
    prepared = method.prepare(stored, weight)
    if method.converts_rows_independently:
        converted = method.convert(RowBlock(prepared, weight[ids]), table.name)
        return converted.lookup(torch.arange(ids.numel())).float()
    return method.convert(prepared, table.name).lookup(ids).float()


def ebc_rows(module: nn.Module, table: TableSpec, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of ``table`` from an EBC-like module (a sharing group's): one bag per id on
    the table's first feature, empty bags on its others."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    feats = list(table.feature_names)
    n = ids.numel()
    lengths = torch.cat(
        [torch.ones(n, dtype=torch.int64)] + [torch.zeros(n, dtype=torch.int64)] * (len(feats) - 1)
    )
    kjt = KeyedJaggedTensor(keys=feats, values=ids, lengths=lengths, stride=n)
    out = module(kjt)
    return out.to_dict()[feats[0]].float()


def quantized_mlp(model: nn.Module, bits: int) -> nn.Module:
    """A copy of ``model``'s dense part (tables left out) with every MLP linear quantized per
    output channel at ``bits``, as ``[mlp] method = "ptq"`` converts it."""
    ebc = model.sparse_arch.embedding_bag_collection
    model.sparse_arch.embedding_bag_collection = nn.Identity()
    try:
        copied = copy.deepcopy(model)
    finally:
        model.sparse_arch.embedding_bag_collection = ebc
    swap_linears(copied, lambda lin: QuantizedLinear.from_float(lin, bits))
    return copied.eval()


@torch.no_grad()
def baseline_logloss(model: nn.Module, cache: SliceCache) -> float:
    """The checkpoint's mean log loss over the cached rows (what every cost is measured from)."""
    return _in_eval(model, lambda: mean_logloss(model, cache))


#: One option to measure: its table (``None``: the MLP) and the option.
Work = tuple[TableSpec | None, Option]


@torch.no_grad()
def measure(
    model: nn.Module,
    spec: DLRMSpec,
    cache: SliceCache,
    work: Sequence[Work],
    baseline: float,
    row_counts: dict[str, torch.Tensor] | None = None,
    desc: str = "sensitivity",
) -> list[float]:
    """The log-loss increase over ``baseline`` of each option of ``work``, in order (``keep``: 0
    without measuring), with a progress bar."""
    return _in_eval(model, lambda: _measure(model, spec, cache, work, baseline, row_counts, desc))


def _in_eval(model: nn.Module, run: Callable[[], T]) -> T:
    was_training = model.training
    model.eval()
    try:
        return run()
    finally:
        model.train(was_training)


def _measure(
    model: nn.Module,
    spec: DLRMSpec,
    cache: SliceCache,
    work: Sequence[Work],
    baseline: float,
    row_counts: dict[str, torch.Tensor] | None,
    desc: str,
) -> list[float]:
    costs = []
    ids_of: dict[str, tuple] = {}
    for table, option in progress(work, total=len(work), desc=desc):
        if option.is_keep:
            costs.append(0.0)
        elif table is None:
            quantized = quantized_mlp(model, int(option.keys["bits"]))
            dense_out = torch.cat(
                [quantized.dense_arch(cache.dense[a : a + CHUNK]) for a in range(0, cache.n, CHUNK)]
            )
            costs.append(mean_logloss(quantized, cache, dense_out=dense_out) - baseline)
        else:
            if table.name not in ids_of:
                ids_of = {table.name: table_ids(cache.bags, table)}  # one table's at a time
            unique, where = ids_of[table.name]
            rows = option_rows(option, table, unique, spec, model, row_counts)
            replace = {
                cache.positions[f]: pool(rows, where[f], cache.bags[f], cache.n)
                for f in table.feature_names
            }
            costs.append(mean_logloss(model, cache, replace) - baseline)
    return costs
