"""Quantization-aware and quantized embedding-bag collections (the DQRM method for tables).

Two modules with TorchRec's ``EmbeddingBagCollection`` interface (``forward(kjt) -> KeyedTensor``,
``embedding_bag_configs()``), so either drops into ``model.sparse_arch.embedding_bag_collection``:

- :class:`QATEmbeddingBagCollection` (prepare): FP32 master weights with sparse gradients. A lookup
  gathers only the rows the batch touches and fake-quantizes **those rows** (DQRM technique 1) with a
  straight-through gradient, then sum-pools the bags. Row-wise tables need no table scan (a row's
  scale depends on the row alone). Table-wise tables keep ``scale`` as a buffer, refreshed from
  ``max|W|`` every ``scale_refresh`` training steps (DQRM technique 2); between refreshes values
  beyond the range clip, exactly as whole-table fake quantization at that scale would.
- :class:`QuantizedEmbeddingBagCollection` (convert): integer codes and scales only, held as
  registered buffers (:class:`ConvertedTable`: they are in ``state_dict()`` and move with
  ``.to()``), dequantizing the gathered rows. :meth:`QuantizedEmbeddingBagCollection.from_qat`
  uses the same quantizers, so its outputs equal the QAT module's outputs exactly (tested with
  ``atol=0``).

Per-table methods: ``keep`` (FP32, trainable), ``fp16`` (rounded to fp16 in the forward),
``ptq`` (quantized once, frozen), ``qat`` (fake-quantized, trainable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compress.io.model import embedding_bag_configs
from compress.io.model_spec import TableSpec
from compress.methods.scale_tracking import BlockAbsmax
from compress.quant import math as qm
from compress.quant import native
from compress.train.config import DEFAULT_SCALE_REFRESH

TABLE_METHODS = ("keep", "fp16", "ptq", "qat")


@dataclass(frozen=True)
class TableQuant:
    """How one table is stored: ``method`` plus, for ptq/qat, ``bits`` and ``granularity`` (row|table)."""

    method: str = "keep"
    bits: int | None = None
    granularity: str | None = None
    scale_refresh: int = DEFAULT_SCALE_REFRESH

    @property
    def quantized(self) -> bool:
        return self.method in ("ptq", "qat")


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


class _Table(nn.Module):
    """One table's FP32 master weight (and table-wise scale) inside the QAT collection."""

    def __init__(self, weight: torch.Tensor, quant: TableQuant) -> None:
        super().__init__()
        self.quant = quant
        trainable = quant.method in ("keep", "fp16", "qat")
        self.weight = nn.Parameter(weight, requires_grad=trainable)
        if quant.quantized and quant.granularity == "table":
            self.register_buffer("scale", torch.tensor(qm.table_scale(weight.detach(), quant.bits)))
        # max|W| summary of a tracked table (see track_scale_updates), valid while the weight's
        # version counter equals _blocks_version
        self._tracked = False
        self._blocks: BlockAbsmax | None = None
        self._blocks_version = -1

    def refresh_scale(self) -> None:
        """Set ``scale`` from ``max|W|``: the whole-table pass DQRM amortizes over P steps.

        A tracked table (:func:`track_scale_updates`) reads its :class:`BlockAbsmax` summary
        instead: the same value, for a few percent of the reading.
        """
        w = self.weight.detach()
        with torch.no_grad():
            if not self._tracked:
                self.scale.fill_(qm.table_scale(w, self.quant.bits))
                return
            if self._blocks is None or self.weight._version != self._blocks_version:
                self._blocks = BlockAbsmax.build(w)  # (re)build: one pass over the table
                self._blocks_version = self.weight._version
            self.scale.fill_(qm.scale_from_absmax(self._blocks.maximum(w), self.quant.bits))

    def _before_step(self) -> None:
        # something other than our optimizer changed the weight since the summary was up to date
        if self._blocks is not None and self.weight._version != self._blocks_version:
            self._blocks = None

    def _after_step(self) -> None:
        # the optimizer changed only the rows of the sparse gradient: fold them into the summary
        # while they are still in the CPU cache
        if self._blocks is None or self.weight._version == self._blocks_version:
            return  # no summary yet, or the optimizer skipped this table
        grad = self.weight.grad
        if grad is None or not grad.is_sparse:
            self._blocks = None  # a dense update may have changed any row: rebuild at refresh
            return
        self._blocks.update(self.weight, grad._indices()[0])
        self._blocks_version = self.weight._version

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[N, D]`` of ``ids [N]`` as the compressed table would return them.

        The fake quantizer overwrites the gathered rows in place under ``no_grad``: autograd sees
        only the gather, whose backward needs the ids alone, so the gradient reaching the table is
        the incoming gradient, unchanged (the straight-through estimator) and still sparse. This
        costs no extra autograd node and no row-sized temporaries on the hot path, and the
        quantizers are the compiled kernels of :mod:`compress.quant.native` (same values as PyTorch's).
        """
        q = self.quant
        rows = F.embedding(ids, self.weight, sparse=True)
        if q.method == "keep":
            return rows
        with torch.no_grad():
            if q.method == "fp16":
                rows.copy_(rows.half())
            elif q.granularity == "row":
                native.fake_quantize_rowwise_(rows, q.bits)
            else:
                native.fake_quantize_tablewise_(rows, float(self.scale), q.bits)
        return rows

    @property
    def refreshes_scale(self) -> bool:
        return self.quant.method == "qat" and self.quant.granularity == "table"


def updates_only_gradient_rows(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` changes only the rows present in a sparse gradient.

    True for plain SGD (no momentum, no weight decay), Adagrad and SparseAdam: their sparse
    updates touch exactly the gradient's rows. Momentum and weight decay reach other rows.
    """
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SparseAdam):
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
    tracked table keeps a :class:`~compress.methods.scale_tracking.BlockAbsmax` summary, folds in the rows
    each ``optimizer.step()`` changed (the sparse gradient's rows, right after the step), and
    refreshes from the summary.

    Exact by construction: only optimizers that change nothing but the gradient's rows are
    tracked (:func:`updates_only_gradient_rows`); any other change of a weight (a loaded state
    dict, an edit by hand, a dense gradient) moves its version counter, and the next refresh then
    rebuilds the summary from the whole table.

    Returns:
        The number of tables tracked: 0 when the optimizer is not row-local, holds no table-wise
        QAT table, or the compiled kernels are unavailable; a table the kernels cannot take (not
        contiguous float32 on the CPU) is left out too. Untracked tables rescan at each refresh.
    """
    if not updates_only_gradient_rows(optimizer) or not native.enabled():
        return 0
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    tables = [
        m
        for m in model.modules()
        if isinstance(m, _Table)
        and m.refreshes_scale
        and id(m.weight) in params
        and native.accepts(m.weight)
    ]
    for t in tables:
        t._tracked = True

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for t in tables:
            t._before_step()

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for t in tables:
            t._after_step()

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

    def _lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pooled(self, features: KeyedJaggedTensor) -> KeyedTensor:
        jagged = features.to_dict()
        pooled = []
        for feature, table in self._feature_table:
            jt = jagged[feature]
            pooled.append(pool_bags(self._lookup(table, jt.values()), jt.lengths()))
        return KeyedTensor(
            keys=self._keys,
            length_per_key=self._dims,
            values=pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1),
        )


class QATEmbeddingBagCollection(_CollectionBase):
    """Fake-quantizing drop-in for TorchRec's ``EmbeddingBagCollection``.

    Args:
        tables: the tables, in the model's order.
        weights: FP32 weight ``[rows, dim]`` per table name (taken over, not copied).
        quant: :class:`TableQuant` per table name (missing tables are kept).
    """

    def __init__(
        self,
        tables: list[TableSpec],
        weights: dict[str, torch.Tensor],
        quant: dict[str, TableQuant],
    ) -> None:
        super().__init__(tables)
        self.embedding_bags = nn.ModuleDict(
            {t.name: _Table(weights[t.name], quant.get(t.name, TableQuant())) for t in self.tables}
        )
        # training forwards so far: table-wise QAT tables rescan max|W| every scale_refresh of them
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self.training:
            step = int(self.steps)
            for mod in self.embedding_bags.values():
                if mod.refreshes_scale and step > 0 and step % mod.quant.scale_refresh == 0:
                    mod.refresh_scale()
            self.steps += 1
        return self._pooled(features)

    def _lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding_bags[table].lookup(ids)


@dataclass
class QuantizedTable:
    """One converted table: what an exporter writes and a runtime reads.

    - ``keep``: ``data`` float32 ``[R, D]``; ``fp16``: ``data`` float16 ``[R, D]``;
    - row-wise: ``data`` uint8 ``[R, D*bits/8]`` packed codes (low bits first), ``scale`` and
      ``bias`` float16 ``[R]``; value = code * scale + bias (FBGEMM's row-wise format);
    - table-wise: ``data`` uint8 ``[R, D*bits/8]`` packed unsigned codes ``q + 2^(bits-1)``,
      ``scale`` float32 scalar; value = (code - 2^(bits-1)) * scale.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    quant: TableQuant
    data: torch.Tensor
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        extra = 0
        if self.scale is not None:
            extra += 4 if self.quant.granularity == "table" else self.scale.numel() * 2
        if self.bias is not None:
            extra += self.bias.numel() * 2
        return self.data.numel() * self.data.element_size() + extra


def quantize_table(
    name: str, weight: torch.Tensor, quant: TableQuant, scale: float | None = None
) -> QuantizedTable:
    """Convert an FP32 table with the same quantizers the QAT forward uses.

    ``scale`` is the table-wise scale to use (the QAT module's current buffer); ``None`` scans the table.
    """
    rows, dim = weight.shape
    w = weight.detach()
    if quant.method == "keep":
        return QuantizedTable(name, rows, dim, quant, w.float().contiguous())
    if quant.method == "fp16":
        return QuantizedTable(name, rows, dim, quant, w.half().contiguous())
    if quant.granularity == "row":
        q, s, b = qm.rowwise_quantize(w, quant.bits)
        return QuantizedTable(name, rows, dim, quant, qm.pack_nbit(q, quant.bits), s, b)
    q, s = qm.tablewise_quantize(w, quant.bits, scale)
    codes = (q.to(torch.int16) + qm.signed_offset(quant.bits)).to(torch.uint8)
    return QuantizedTable(
        name, rows, dim, quant, qm.pack_nbit(codes, quant.bits), torch.tensor(float(s))
    )


def dequantize_rows(table: QuantizedTable, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``[N, D]`` of ``ids`` from a converted table (dequantizing only those rows)."""
    quant = table.quant
    gathered = table.data.index_select(0, ids)
    if quant.method == "keep":
        return gathered
    if quant.method == "fp16":
        return gathered.float()
    codes = qm.unpack_nbit(gathered, quant.bits, table.embedding_dim)
    if quant.granularity == "row":
        return qm.rowwise_dequantize(
            codes, table.scale.index_select(0, ids), table.bias.index_select(0, ids)
        )
    q = codes.to(torch.int16) - qm.signed_offset(quant.bits)
    return qm.tablewise_dequantize(q.to(torch.int8), float(table.scale))


class ConvertedTable(nn.Module):
    """One converted table as module state: ``data``, ``scale`` and ``bias`` are registered buffers
    (``scale``/``bias`` are ``None``, and not in the state dict, where the layout has none), so
    ``state_dict()`` holds them and ``.to()`` moves them."""

    def __init__(self, table: QuantizedTable) -> None:
        super().__init__()
        self.name = table.name
        self.num_embeddings = table.num_embeddings
        self.embedding_dim = table.embedding_dim
        self.quant = table.quant
        self.register_buffer("data", table.data)
        self.register_buffer("scale", table.scale)
        self.register_buffer("bias", table.bias)

    def table(self) -> QuantizedTable:
        """The :class:`QuantizedTable` of this module's current buffers (no copy)."""
        return QuantizedTable(
            self.name,
            self.num_embeddings,
            self.embedding_dim,
            self.quant,
            self.data,
            self.scale,
            self.bias,
        )

    def extra_repr(self) -> str:
        q = self.quant
        return (
            f"{self.name!r}, {self.num_embeddings}x{self.embedding_dim}, {q.method} {q.bits or ''}"
        )


class QuantizedEmbeddingBagCollection(_CollectionBase):
    """Inference drop-in for TorchRec's ``EmbeddingBagCollection`` holding only converted tables.

    Each table is a :class:`ConvertedTable` under ``embedding_bags.<table>``: its packed codes,
    scales and biases are buffers (state-dict keys ``embedding_bags.<table>.data``, ``.scale``,
    ``.bias``), so ``torch.save(model.state_dict())`` keeps them, ``load_state_dict`` restores
    them into a module of the same tables and methods, and ``.to(device)`` moves them.
    """

    def __init__(self, tables: list[TableSpec], quantized: dict[str, QuantizedTable]) -> None:
        super().__init__(tables)
        self.embedding_bags = nn.ModuleDict(
            {t.name: ConvertedTable(quantized[t.name]) for t in self.tables}
        )

    @property
    def quantized(self) -> dict[str, QuantizedTable]:
        """Every table as a :class:`QuantizedTable` over this module's buffers, in table order."""
        return {name: mod.table() for name, mod in self.embedding_bags.items()}

    @classmethod
    def from_qat(cls, qat: QATEmbeddingBagCollection) -> QuantizedEmbeddingBagCollection:
        quantized = {}
        for t in qat.tables:
            mod = qat.embedding_bags[t.name]
            scale = float(mod.scale) if hasattr(mod, "scale") else None
            quantized[t.name] = quantize_table(t.name, mod.weight, mod.quant, scale)
        return cls(qat.tables, quantized)

    @torch.no_grad()
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self._pooled(features)

    def _lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.embedding_bags[table].table(), ids)
