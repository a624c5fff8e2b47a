"""One training step's gradient exchange: after it, every rank holds the same summed gradient.

Each rank back-propagates the loss of its share of the global batch, scaled so that the ranks'
gradients add up to the single-process gradient of the whole batch
(:mod:`compress.train.distributed.data_parallel`). Then, in parameter order:

1. **Header** (``all_gather``, int64 per parameter): how many distinct rows this rank's sparse
   gradient of each parameter has (``-1``: a dense gradient; ``-2``: none), and the rank's loss.
2. **Embedding rows** (``all_gather`` of each rank's :mod:`~compress.train.distributed.wire`
   message, padded to the longest): each rank coalesces its sparse gradients (distinct rows,
   summed) and sends their ids and values, INT8 with a scale per row at ``embedding_grad_bits =
   8`` or float32 at ``32``. Every rank decodes every message and adds the rows in rank order, so
   all ranks compute the same sum from the same (dequantized) contributions and the replicas stay
   identical; the result is a coalesced sparse gradient, which the optimizers take as before.
   Tables of one row size are handled together as one id space (:class:`SparseGroup`): one
   coalescing, one coding and one sum per group and step, whatever the number of tables.
3. **Dense gradients** (the MLPs and any parameter with a dense gradient), flattened into one
   buffer: at ``mlp_grad_bits = 32`` an ``all_reduce`` sum; at ``8`` each rank adds its error-
   feedback residual (what quantization dropped at its previous steps), sends INT8 codes with a
   float32 scale per 256 values (``all_gather``), keeps the new residual, and every rank adds the
   dequantized contributions in rank order.

With both widths at 32 nothing is rounded on the way: the summed gradient equals the single-
process gradient up to the order float additions are made in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.io.cow_map import cow_map_of, prefault
from compress.train.distributed.comm import Comm
from compress.train.distributed.grad_codec import (
    BLOCK,
    blocks_of,
    dequantize_rows,
    quantize_rows,
)
from compress.train.distributed.wire import SparseLayout

DENSE_BITS = (8, 32)
#: Header codes: a dense gradient, no gradient (a sparse one sends its row count, >= 0).
DENSE, ABSENT = -1, -2
_INT32_ROWS = 2**31 - 1


@dataclass(frozen=True)
class ExchangeSettings:
    """The recipe's ``embedding_grad_bits`` and ``mlp_grad_bits`` (8 or 32)."""

    embedding_bits: int = 32
    dense_bits: int = 32

    def __post_init__(self) -> None:
        if self.embedding_bits not in (8, 32) or self.dense_bits not in DENSE_BITS:
            raise ValueError(
                f"gradient bits must be 8 or 32, got {self.embedding_bits}, {self.dense_bits}"
            )


@dataclass
class StepCounts:
    """What the exchanges so far moved, for the accounting (:mod:`.accounting`): steps, distinct
    rows sent, the floor of the INT8 scheme (rows x (dim + 4 B scale + 4 B id) + dense values at
    their width) and the bytes of the same rows at FP32."""

    steps: int = 0
    rows: int = 0
    floor_bytes: int = 0
    sparse_fp32_bytes: int = 0
    per_table_rows: dict[int, int] = field(default_factory=dict)
    #: seconds of the embedding part (coalescing, coding, gathering, decoding, summing) and of the
    #: dense part of the exchanges
    sparse_seconds: float = 0.0
    dense_seconds: float = 0.0


@dataclass(frozen=True)
class SparseGroup:
    """Parameters with sparse gradients and one row size, handled as one id space: parameter
    ``params[j]``'s row ``r`` is ``offsets[j] + r``."""

    params: tuple[int, ...]
    dim: int
    offsets: torch.Tensor  # int64 [len(params) + 1], the last one the group's total rows


class GradExchange:
    """Exchanges the gradients of ``tables`` and ``dense`` (every trainable parameter, the same
    lists in the same order on every rank) after each backward pass; :meth:`step` returns the
    global loss. Only ``tables`` may have sparse gradients; one of them with a dense gradient
    (a small shared ROBE-Z array) travels with the dense ones."""

    def __init__(
        self,
        tables: Sequence[nn.Parameter],
        dense: Sequence[nn.Parameter],
        comm: Comm,
        settings: ExchangeSettings,
    ):
        self.params = [*tables, *dense]
        self.comm = comm
        self.settings = settings
        big = any(p.dim() > 0 and p.shape[0] > _INT32_ROWS for p in tables)
        self.id_dtype = torch.int64 if big else torch.int32
        self.counts = StepCounts()
        #: error feedback of the dense INT8 exchange: this rank's residual, for ``_dense_key``
        self.residual: torch.Tensor | None = None
        self._dense_key: tuple[int, ...] = ()
        self.groups = _groups_by_row_size(tables)
        self._tables = len(tables)

    def step(self, local_loss: float) -> float:
        """Replace every parameter's gradient by the sum over the ranks; the sum of the ranks'
        ``local_loss`` (each its share of the global batch's mean loss)."""
        start = time.perf_counter()
        device = self.comm.ctx.device
        header = torch.empty(len(self.params) + 1, dtype=torch.int64)
        for i, p in enumerate(self.params):
            g = p.grad
            header[i] = ABSENT if g is None else (0 if g.is_sparse else DENSE)
        stray = [i for i in range(self._tables, len(self.params)) if header[i] == 0]
        if stray:
            raise RuntimeError(f"parameters {stray} have sparse gradients but are not tables")
        # this rank's coalesced rows per group (their counts go into the header)
        local = []
        for group in self.groups:
            ids, values, counts = self._coalesce(group)
            local.append((ids, values))
            for j, i in enumerate(group.params):
                if header[i] == 0:
                    header[i] = int(counts[j])
        header[-1:] = torch.tensor([local_loss], dtype=torch.float64).view(torch.int64)
        headers = torch.stack(self.comm.all_gather(header.to(device), "header")).cpu()
        self._check_headers(headers)
        loss = sum(float(v) for v in headers[:, -1:].contiguous().view(torch.float64).reshape(-1))
        kinds = [_kind(headers[:, i], self.params[i]) for i in range(len(self.params))]
        self._exchange_sparse(local, headers, kinds)
        middle = time.perf_counter()
        self._exchange_dense(kinds)
        self.counts.sparse_seconds += middle - start
        self.counts.dense_seconds += time.perf_counter() - middle
        self.counts.steps += 1
        return loss

    def _check_headers(self, headers: torch.Tensor) -> None:
        """``RuntimeError`` when a rank's header is not one this code sends: a table's count is
        ``DENSE``, ``ABSENT`` or 0 to its rows; any other parameter's ``DENSE`` or ``ABSENT``
        (what bounds the messages every rank then allocates and cuts)."""
        codes = headers[:, :-1]
        rows = torch.tensor([p.shape[0] if p.dim() else 1 for p in self.params])
        rows[self._tables :] = -1  # no rows: dense or absent only
        bad = (codes < ABSENT) | (codes > rows)
        if bad.any():
            r, i = (int(v) for v in bad.nonzero()[0])
            raise RuntimeError(
                f"rank {r} announced {int(codes[r, i])} rows for parameter {i} of shape "
                f"{tuple(self.params[i].shape)}: not a count this exchange sends"
            )

    def _coalesce(self, group: SparseGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's distinct rows of ``group`` (table after table, each ascending; ids of the
        table's own rows), their summed gradients (repeats added in the order they occur), and
        how many rows each table has."""
        device = self.comm.ctx.device
        ids, values = [], []
        for j, i in enumerate(group.params):
            g = self.params[i].grad
            if g is None or not g.is_sparse:
                continue
            ids.append(g._indices()[0] + int(group.offsets[j]))
            values.append(g._values().reshape(-1, group.dim))
        if not ids:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            zeros = torch.zeros(len(group.params), dtype=torch.int64)
            return empty, torch.empty(0, group.dim, device=device), zeros
        unique, summed = sum_rows(torch.cat(ids), torch.cat(values))
        bounds = torch.searchsorted(unique.cpu(), group.offsets)
        counts = bounds[1:] - bounds[:-1]
        starts = torch.repeat_interleave(group.offsets[:-1], counts).to(unique.device)
        return unique - starts, summed, counts

    def _exchange_sparse(
        self,
        local: list[tuple[torch.Tensor, torch.Tensor]],
        headers: torch.Tensor,
        kinds: list[str],
    ) -> None:
        if "sparse" not in kinds:
            return
        groups = self.groups
        layout = SparseLayout(
            tuple(g.dim for g in groups), self.settings.embedding_bits, self.id_dtype
        )
        world = headers.shape[0]
        # rows per rank and table (-1 dense, -2 none: no rows)
        per_table = [headers[:, list(g.params)].clamp(min=0) for g in groups]
        message = layout.encode(local).to(self.comm.ctx.device)
        sizes = [[int(t[r].sum()) for t in per_table] for r in range(world)]
        lengths = [layout.message_bytes(c) for c in sizes]
        gathered = self.comm.all_gather_padded(message, lengths, "embedding")
        decoded = [layout.decode(m, c) for m, c in zip(gathered, sizes, strict=True)]
        self._count_rows(groups, per_table)
        for k, g in enumerate(groups):
            ids, values = [], []
            sizes_k = g.offsets.diff()
            for r in range(world):  # rank order: the same sum on every rank
                rank_ids, rank_values = decoded[r][k]
                starts = torch.repeat_interleave(g.offsets[:-1], per_table[k][r])
                limits = torch.repeat_interleave(sizes_k, per_table[k][r]).to(rank_ids.device)
                if bool(((rank_ids < 0) | (rank_ids >= limits)).any()):
                    raise RuntimeError(f"rank {r} sent embedding rows outside their tables")
                ids.append(rank_ids + starts.to(rank_ids.device))
                values.append(rank_values)
            unique, summed = sum_rows(torch.cat(ids), torch.cat(values))
            bounds = torch.searchsorted(unique.cpu(), g.offsets).tolist()
            for j, i in enumerate(g.params):
                if kinds[i] != "sparse":  # no gradient anywhere, or a dense one (sent apart)
                    continue
                p = self.params[i]
                lo, hi = bounds[j], bounds[j + 1]
                rows = (unique[lo:hi] - int(g.offsets[j])).to(p.device)
                _prefault_rows(p, rows)
                p.grad = torch.sparse_coo_tensor(
                    rows[None],
                    summed[lo:hi].to(p.device, p.dtype).reshape(hi - lo, *p.shape[1:]),
                    size=p.shape,
                    is_coalesced=True,
                    check_invariants=False,  # sorted distinct rows in range, by construction
                )

    def _count_rows(self, groups: list[SparseGroup], per_table: list[torch.Tensor]) -> None:
        """Add this rank's rows of the step to :attr:`counts`."""
        c = self.counts
        rank = self.comm.ctx.rank
        for g, table_rows in zip(groups, per_table, strict=True):
            for j, i in enumerate(g.params):
                n = int(table_rows[rank, j])
                c.rows += n
                c.floor_bytes += n * (g.dim + 4 + 4)
                c.sparse_fp32_bytes += n * (4 * g.dim + 4)
                c.per_table_rows[i] = c.per_table_rows.get(i, 0) + n

    def _exchange_dense(self, kinds: list[str]) -> None:
        index = [i for i, k in enumerate(kinds) if k == "dense"]
        if not index:
            return
        device = self.comm.ctx.device
        flat = torch.cat(
            [
                (
                    self.params[i].grad
                    if self.params[i].grad is not None
                    else torch.zeros_like(self.params[i])
                )
                .reshape(-1)
                .to(device=device, dtype=torch.float32)
                for i in index
            ]
        )
        bits = self.settings.dense_bits
        self.counts.floor_bytes += flat.numel() * bits // 8
        if bits == 32:
            self.comm.all_reduce_sum(flat, "dense")
            total = flat
        else:
            total = self._int8_with_feedback(flat, tuple(index))
        at = 0
        for i in index:  # views of the summed buffer (the optimizers only read gradients)
            p = self.params[i]
            n = p.numel()
            p.grad = total[at : at + n].view_as(p).to(p.device, p.dtype)
            at += n

    def _int8_with_feedback(self, flat: torch.Tensor, key: tuple[int, ...]) -> torch.Tensor:
        """The ranks' INT8-coded dense gradients summed; this rank's coding error is kept and
        added to its next step's gradient (error feedback)."""
        n = flat.numel()
        if self.residual is None or self._dense_key != key or self.residual.numel() != n:
            self.residual = torch.zeros_like(flat)
            self._dense_key = key
        rows = blocks_of(flat, BLOCK)  # [blocks, BLOCK], zero-padded
        rows.view(-1)[:n] += self.residual
        codes, scales = quantize_rows(rows)
        self.residual = (rows - dequantize_rows(codes, scales)).view(-1)[:n]
        message = torch.cat([scales.view(torch.uint8), codes.view(-1).view(torch.uint8)])
        n_scales = scales.numel() * 4
        total = torch.zeros_like(rows)
        for m in self.comm.all_gather(message, "dense"):  # rank order: the same sum everywhere
            s = m[:n_scales].view(torch.float32)
            total += dequantize_rows(m[n_scales:].view(torch.int8).view_as(rows), s)
        return total.view(-1)[:n]

    def residual_state(self) -> dict | None:
        """This rank's error-feedback residual (to save with the training state), or ``None``."""
        if self.residual is None:
            return None
        return {"key": list(self._dense_key), "residual": self.residual.detach().cpu()}

    def load_residual_state(self, state: dict | None) -> None:
        """Restore :meth:`residual_state` (``None``: start from zero)."""
        if state is None:
            self.residual, self._dense_key = None, ()
            return
        self._dense_key = tuple(int(k) for k in state["key"])
        self.residual = state["residual"].to(self.comm.ctx.device)


def sum_rows(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distinct rows ascending, their summed values)``; repeats added in the order given on
    the CPU (``index_add_`` is sequential there). On a GPU, ``index_add_`` adds with atomics in
    an order that can differ from run to run and from rank to rank, so it runs in PyTorch's
    deterministic mode (:func:`deterministic`): every rank gets the same bits from the same
    inputs, which is what keeps the replicas identical."""
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    summed = torch.zeros(unique.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    with deterministic(values.device):
        return unique, summed.index_add_(0, inverse.to(values.device), values)


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """PyTorch's deterministic algorithms for the block (on a non-CPU ``device`` only; warnings,
    not errors, for operations without a deterministic version), then the previous setting."""
    if device.type == "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _prefault_rows(param: torch.Tensor, rows: torch.Tensor) -> None:
    """The optimizer is about to write ``rows`` of ``param``: when ``param`` is a copy-on-write
    map of the checkpoint (:mod:`compress.io.cow_map`), fault their pages in for writing in one
    call per run of pages, as the lookup does for this rank's own rows (the other ranks' rows
    would otherwise fault one page at a time inside the optimizer). Only memory changes."""
    cow = cow_map_of(param)
    if cow is not None:
        prefault(cow, rows.cpu(), write=True)


def _groups_by_row_size(tables: Sequence[nn.Parameter]) -> list[SparseGroup]:
    """``tables`` (parameters ``0..len - 1``) grouped by row size, each in parameter order."""
    by_dim: dict[int, list[int]] = {}
    for i, p in enumerate(tables):
        by_dim.setdefault(_row_size(p), []).append(i)
    groups = []
    for dim, members in by_dim.items():
        rows = [tables[i].shape[0] if tables[i].dim() else 1 for i in members]
        offsets = torch.tensor([0, *rows], dtype=torch.int64).cumsum(0)
        groups.append(SparseGroup(tuple(members), dim, offsets))
    return groups


def _row_size(param: torch.Tensor) -> int:
    """Values per row of ``param`` (1 for a one-dimensional parameter)."""
    size = 1
    for s in param.shape[1:]:
        size *= int(s)
    return size


def _kind(codes: torch.Tensor, param: torch.Tensor) -> str:
    """``sparse``, ``dense`` or ``absent``: what the ranks' header codes say about a parameter's
    gradient (a rank without one sends nothing for it)."""
    values = set(int(c) for c in codes)
    sparse = any(v >= 0 for v in values)
    if sparse and DENSE in values:
        raise RuntimeError(
            f"a parameter of shape {tuple(param.shape)} has a sparse gradient on one rank and a "
            "dense one on another"
        )
    if sparse:
        return "sparse"
    return "dense" if DENSE in values else "absent"
