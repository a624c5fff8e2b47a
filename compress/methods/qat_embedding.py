"""Prepared and converted embedding-bag collections of per-table methods (the DQRM method for tables).

Two modules with TorchRec's ``EmbeddingBagCollection`` interface (``forward(kjt) -> KeyedTensor``,
``embedding_bag_configs()``), so either drops into ``model.sparse_arch.embedding_bag_collection``;
each holds one module per table, made by that table's method (:mod:`compress.methods.registry`):

- :class:`QATEmbeddingBagCollection` (prepare): a :class:`~compress.methods.registry.PreparedTable`
  per table, FP32 master weights with sparse gradients. A lookup gathers only the rows the batch
  touches and fake-quantizes **those rows** (DQRM technique 1) with a straight-through gradient,
  then sum-pools the bags. Row-wise tables need no table scan (a row's scale depends on the row
  alone); table-wise tables refresh their scale from ``max|W|`` every ``scale_refresh`` training
  steps (DQRM technique 2, :mod:`compress.methods.tablewise`).
- :class:`QuantizedEmbeddingBagCollection` (convert): a
  :class:`~compress.methods.registry.ConvertedTable` per table, its stored arrays as registered
  buffers (in ``state_dict()``, moved by ``.to()``), dequantizing the gathered rows.
  :meth:`QuantizedEmbeddingBagCollection.from_qat` uses the same quantizers, so its outputs equal
  the QAT module's outputs exactly (tested with ``atol=0``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compress.io.cow_map import ResidentGuard, cow_map_of, prefault
from compress.io.model import embedding_bag_configs
from compress.io.model_spec import TableSpec
from compress.methods import registry
from compress.methods.base import ConvertedTable, MethodConfig, PreparedTable
from compress.quant import native
from compress.train.rowwise_adagrad import RowwiseAdagrad


def pool_bags(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum-pool ``rows [N, D]`` into ``[B, D]`` bags of ``lengths [B]`` (empty bags give zeros).

    One-id bags (every length 1) are returned as they are: a bag of one row is that row.
    """
    batch = lengths.shape[0]
    if rows.shape[0] == batch and bool((lengths == 1).all()):
        return rows
    segments = torch.repeat_interleave(torch.arange(batch, device=rows.device), lengths)
    return torch.zeros(batch, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(
        0, segments, rows
    )


def updates_only_gradient_rows(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` changes only the rows present in a sparse gradient.

    True for plain SGD (no momentum, no weight decay), Adagrad, SparseAdam and row-wise Adagrad
    (:class:`~compress.train.rowwise_adagrad.RowwiseAdagrad`): their sparse updates touch exactly
    the gradient's rows. Momentum and weight decay reach other rows.
    """
    groups = optimizer.param_groups
    if isinstance(optimizer, (torch.optim.SparseAdam, RowwiseAdagrad)):
        return True
    if isinstance(optimizer, torch.optim.Adagrad):
        return all(g.get("weight_decay", 0) == 0 for g in groups)
    if isinstance(optimizer, torch.optim.SGD):
        return all(g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 for g in groups)
    return False


def track_scale_updates(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Make the table-wise scale refresh of ``model``'s QAT tables cheap, and keep it exact.

    DQRM refreshes a table's scale from ``max|W|`` every P steps; on CPU that whole-table pass is
    memory-bound (~20 ms for 10M x 16 FP32) and, at P=200, costs about a third of a step. A
    tracked table keeps a summary (:class:`~compress.methods.scale_tracking.BlockAbsmax`), folds
    in the rows each ``optimizer.step()`` changed (the sparse gradient's rows, right after the
    step), and refreshes from the summary.

    Exact by construction: only optimizers that change nothing but the gradient's rows are
    tracked (:func:`updates_only_gradient_rows`); any other change of a weight (a loaded state
    dict, an edit by hand, a dense gradient) moves its version counter, and the next refresh then
    rebuilds the summary from the whole table.

    Returns:
        The number of tables tracked: 0 when the optimizer is not row-local, holds no table that
        refreshes a scale, or the compiled kernels are unavailable; a table the kernels cannot
        take (not contiguous float32 on the CPU) is left out too. Untracked tables rescan.
    """
    if not updates_only_gradient_rows(optimizer) or not native.enabled():
        return 0
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    tables = [
        m
        for m in model.modules()
        if isinstance(m, PreparedTable)
        and m.refreshes_scale
        and id(m.weight) in params
        and native.accepts(m.weight)
    ]
    for t in tables:
        t.track()

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for t in tables:
            t.before_optimizer_step()

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for t in tables:
            t.after_optimizer_step()

    if tables:
        optimizer.register_step_pre_hook(before)
        optimizer.register_step_post_hook(after)
    return len(tables)


class _CollectionBase(nn.Module):
    """What both collections share: the table list, TorchRec configs and the pooled forward."""

    def __init__(self, tables: list[TableSpec]) -> None:
        super().__init__()
        self.tables = list(tables)
        self._feature_table = [(f, t.name) for t in self.tables for f in t.feature_names]
        self._keys = [f for f, _ in self._feature_table]
        self._dims = [t.embedding_dim for t in self.tables for _ in t.feature_names]

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return embedding_bag_configs(self.tables)

    def _pooled(self, features: KeyedJaggedTensor) -> KeyedTensor:
        jagged = features.to_dict()
        pooled = []
        for feature, table in self._feature_table:
            jt = jagged[feature]
            ids = jt.values()
            self._before_lookup(table, ids)
            pooled.append(pool_bags(self.embedding_bags[table].lookup(ids), jt.lengths()))
        self._after_lookups()
        return KeyedTensor(
            keys=self._keys,
            length_per_key=self._dims,
            values=pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1),
        )

    def _before_lookup(self, table: str, ids: torch.Tensor) -> None:
        """Called before table ``table`` looks up rows ``ids``."""

    def _after_lookups(self) -> None:
        """Called once after every table of a batch looked its rows up."""


class QATEmbeddingBagCollection(_CollectionBase):
    """Fake-quantizing drop-in for TorchRec's ``EmbeddingBagCollection``.

    A table whose master weight is a copy-on-write map of the checkpoint
    (:mod:`compress.io.cow_map`, made by :func:`compress.methods.apply_plan.copy_trained_weights`)
    faults the pages of the rows a lookup reads in before it reads them (for writing when the
    table trains), and after the lookup the file pages that maps hold are given back once they
    exceed a budget (:class:`~compress.io.cow_map.ResidentGuard`): memory, never values, changes.

    Args:
        tables: the tables, in the model's order.
        weights: FP32 weight ``[rows, dim]`` per table name (taken over, not copied).
        configs: the method config of each table (missing tables are kept as they are).
    """

    def __init__(
        self,
        tables: list[TableSpec],
        weights: dict[str, torch.Tensor],
        configs: dict[str, MethodConfig],
    ) -> None:
        super().__init__(tables)
        kept = registry.default_config()
        prepared = {}
        for t in self.tables:
            config = configs.get(t.name, kept)
            prepared[t.name] = registry.for_config(config).prepare(config, weights[t.name])
        self.embedding_bags = nn.ModuleDict(prepared)
        # training forwards so far (a table-wise table rescans max|W| every scale_refresh of them)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self._resident = ResidentGuard()

    def _before_lookup(self, table: str, ids: torch.Tensor) -> None:
        weight = self.embedding_bags[table].weight
        cow = cow_map_of(weight)
        if cow is not None:
            trains = self.training and weight.requires_grad and torch.is_grad_enabled()
            prefault(cow, ids, write=trains)

    def _after_lookups(self) -> None:
        # once a batch, not once a table: the check reads /proc/self/statm
        if any(cow_map_of(mod.weight) is not None for mod in self.embedding_bags.values()):
            self._resident.check()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.training:
            step = int(self.steps)
            for mod in self.embedding_bags.values():
                mod.training_step(step)
            self.steps += 1
        return self._pooled(features)


class QuantizedEmbeddingBagCollection(_CollectionBase):
    """Inference drop-in for TorchRec's ``EmbeddingBagCollection`` holding only converted tables.

    Each table is a :class:`~compress.methods.registry.ConvertedTable` under
    ``embedding_bags.<table>``: its stored arrays are buffers (state-dict keys
    ``embedding_bags.<table>.data``, ``.scale``, ``.bias`` as its method stores them), so
    ``torch.save(model.state_dict())`` keeps them, ``load_state_dict`` restores them into a
    module of the same tables and methods, and ``.to(device)`` moves them.
    """

    def __init__(self, tables: list[TableSpec], converted: dict[str, ConvertedTable]) -> None:
        super().__init__(tables)
        self.embedding_bags = nn.ModuleDict({t.name: converted[t.name] for t in self.tables})

    @property
    def quantized(self) -> dict[str, ConvertedTable]:
        """Every converted table, in table order."""
        return dict(self.embedding_bags.items())

    @classmethod
    def from_qat(cls, qat: QATEmbeddingBagCollection) -> QuantizedEmbeddingBagCollection:
        converted = {}
        for t in qat.tables:
            prepared = qat.embedding_bags[t.name]
            converted[t.name] = registry.for_config(prepared.config).convert(prepared, t.name)
        return cls(qat.tables, converted)

    @torch.no_grad()
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self._pooled(features)
