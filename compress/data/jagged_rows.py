"""Multi-hot rows of a stream: blocks whose bags hold any number of ids, and their shuffle buffer.

Criteo text and npy days are one-hot, and their blocks are
:class:`~compress.data.stream_source.RowBlock` objects (one id per feature and row). Parquet list
columns (:mod:`compress.data.parquet_source`) and in-process TorchRec batches
(:mod:`compress.data.batch_source`) hold bags of any size; their blocks are :class:`JaggedRows`:

- ``labels`` float32 ``[n]``, ``dense`` float32 ``[n, D]`` (transformed), as in a ``RowBlock``;
- ``lengths`` int64 ``[n, F]``: the size of row ``i``'s bag of feature ``j`` (0 for an empty bag);
- ``values`` int64: every bag's ids, **row-major** (row 0's bag of feature 0, its bag of feature
  1, ..., then row 1's bags), so that rows are gathered like a jagged array of rows.

:class:`JaggedShuffleBuffer` shuffles them with exactly the draws of the one-hot
:class:`~compress.data.row_batches.ShuffleBuffer` (the same seed gives the same order of rows),
but holds rows by reference: slot ``k`` of the buffer names a row of the blocks received, and
those blocks are compacted into one once they hold more than twice the buffer's rows. Memory: at
most ``2 * shuffle_rows`` rows plus one block, whatever the bag sizes (a fixed-width buffer would
need room for the longest bag in every row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compress.data.dataset import Dataset, take_jagged
from compress.data.shuffle_draws import draw_overflow


@dataclass(frozen=True)
class JaggedRows:
    """Rows with multi-hot bags (see the module docstring); ``skipped`` and ``seconds`` as in a
    :class:`~compress.data.stream_source.RowBlock`."""

    labels: np.ndarray
    dense: np.ndarray
    lengths: np.ndarray
    values: np.ndarray
    skipped: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def row_offsets(self) -> np.ndarray:
        """int64 ``[n + 1]``: row ``i``'s ids are ``values[offsets[i]:offsets[i + 1]]``."""
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.lengths.sum(axis=1), out=offsets[1:])
        return offsets

    def take(self, index: np.ndarray) -> JaggedRows:
        """The rows at ``index`` (a copy)."""
        index = np.asarray(index, dtype=np.int64)
        values, _ = take_jagged(self.values, self.row_offsets(), index)
        return JaggedRows(self.labels[index], self.dense[index], self.lengths[index], values)

    def head(self, n: int) -> JaggedRows:
        n = min(max(n, 0), len(self))
        stop = int(self.lengths[:n].sum())
        return JaggedRows(self.labels[:n], self.dense[:n], self.lengths[:n], self.values[:stop])

    def tail(self, n: int) -> JaggedRows:
        """Rows ``n`` onwards."""
        n = min(max(n, 0), len(self))
        start = int(self.lengths[:n].sum())
        return JaggedRows(self.labels[n:], self.dense[n:], self.lengths[n:], self.values[start:])

    def feature_ids(self, j: int) -> np.ndarray:
        """Every id of feature ``j``, in row order."""
        values, _ = take_jagged(self.values, self._bag_offsets(), self._bags_of(j))
        return values

    def feature_offsets(self, j: int) -> np.ndarray:
        """int64 ``[n + 1]`` offsets of feature ``j``'s bags in :meth:`feature_ids`."""
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.lengths[:, j], out=offsets[1:])
        return offsets

    def _bag_offsets(self) -> np.ndarray:
        offsets = np.zeros(self.lengths.size + 1, dtype=np.int64)
        np.cumsum(self.lengths.reshape(-1), out=offsets[1:])
        return offsets

    def _bags_of(self, j: int) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64) * self.lengths.shape[1] + j


def concat_jagged(blocks: Sequence[JaggedRows]) -> JaggedRows:
    """The rows of ``blocks`` one after another."""
    if len(blocks) == 1:
        return blocks[0]
    return JaggedRows(
        np.concatenate([b.labels for b in blocks]),
        np.concatenate([b.dense for b in blocks]),
        np.concatenate([b.lengths for b in blocks]),
        np.concatenate([b.values for b in blocks]),
    )


def one_hot_rows(labels: np.ndarray, dense: np.ndarray, ids: np.ndarray) -> JaggedRows:
    """One-hot rows (``ids`` int64 ``[n, F]``) as :class:`JaggedRows`."""
    return JaggedRows(labels, dense, np.ones(ids.shape, dtype=np.int64), ids.reshape(-1).copy())


def jagged_to_batch(rows: JaggedRows, feature_names: Sequence[str]):
    """A :class:`~compress.data.batches.Batch` of ``rows``; equal to ``Dataset.to_batch`` of the
    same rows (KJT values key-major: every bag of the first feature, then the next feature's)."""
    import torch  # here, not at import: stream workers never import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from compress.data.batches import Batch

    n, f = rows.lengths.shape
    order = (
        np.arange(f, dtype=np.int64)[:, None] + np.arange(n, dtype=np.int64)[None, :] * f
    ).reshape(-1)
    values, _ = take_jagged(rows.values, rows._bag_offsets(), order)
    lengths = np.ascontiguousarray(rows.lengths.T).reshape(-1)
    sparse = KeyedJaggedTensor(
        keys=list(feature_names),
        values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
        lengths=torch.from_numpy(lengths),
        stride=n,
        length_per_key=[int(x) for x in rows.lengths.sum(axis=0)],
    )
    return Batch(
        dense=torch.from_numpy(np.array(rows.dense, dtype=np.float32, copy=True, order="C")),
        sparse=sparse,
        labels=torch.from_numpy(np.array(rows.labels, dtype=np.float32, copy=True)),
    )


def rows_to_dataset(
    blocks: Sequence, feature_names: Sequence[str], num_dense: int, dense_transform: str | None
) -> Dataset:
    """One in-memory :class:`Dataset` of every row of ``blocks`` (``RowBlock`` or
    :class:`JaggedRows`, all of one kind), in order: how a source that streams is read whole."""
    keys = tuple(feature_names)
    if not blocks:
        return Dataset(
            dense=np.zeros((0, num_dense), np.float32),
            labels=np.zeros(0, np.float32),
            values={k: np.zeros(0, np.int64) for k in keys},
            offsets={k: np.zeros(1, np.int64) for k in keys},
            dense_transform=dense_transform,
        )
    if isinstance(blocks[0], JaggedRows):
        rows = concat_jagged(list(blocks))
        values = {k: rows.feature_ids(j) for j, k in enumerate(keys)}
        offsets = {k: rows.feature_offsets(j) for j, k in enumerate(keys)}
    else:
        from compress.data.stream_source import concat_blocks

        rows = concat_blocks(list(blocks))
        one = np.arange(len(rows) + 1, dtype=np.int64)
        values = {k: np.ascontiguousarray(rows.ids[:, j]) for j, k in enumerate(keys)}
        offsets = {k: one for k in keys}
    return Dataset(
        dense=rows.dense,
        labels=rows.labels,
        values=values,
        offsets=offsets,
        dense_transform=dense_transform,
    )


class JaggedShuffleBuffer:
    """The seeded shuffle buffer of :class:`~compress.data.row_batches.ShuffleBuffer` for
    :class:`JaggedRows`: the same draws from the same ``rng`` hand on the same rows in the same
    order; rows are held by reference (module docstring). Same interface: :meth:`push`,
    :meth:`drain`, :meth:`reset`, ``max_size``."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self.size = 0
        self.max_size = 0
        self._slots = np.empty(capacity, dtype=np.int64)  # row numbers in the store
        self._pieces: list[JaggedRows] = []
        self._starts: list[int] = []  # first row number of each piece
        self._rows = 0  # rows in the store

    def reset(self, rng: np.random.Generator) -> None:
        """Start a new pass: empty, drawing from ``rng``."""
        self.rng, self.size = rng, 0
        self._pieces, self._starts, self._rows = [], [], 0

    def push(self, block: JaggedRows) -> JaggedRows | None:
        m = len(block)
        if m == 0:
            return None
        if self.capacity == 0:
            return block.take(self.rng.permutation(m))
        base = self._add(block)
        n, cap = self.size, self.capacity
        if n + m <= cap:
            self._slots[n : n + m] = base + np.arange(m, dtype=np.int64)
            self.size = n + m
            self.max_size = max(self.max_size, self.size)
            return None
        draw = draw_overflow(self.rng, n, m, cap)
        handed = np.empty(draw.count, dtype=np.int64)
        handed[draw.at_buffer] = self._slots[draw.buffer_rows]
        handed[draw.at_block] = base + draw.block_rows
        self._slots[draw.slots] = base + draw.stay
        self.size = cap
        self.max_size = max(self.max_size, self.size)
        out = self._gather(handed)
        if self._rows > 2 * cap:
            self._compact()
        return out

    def drain(self) -> JaggedRows | None:
        if self.size == 0:
            return None
        order = self.rng.permutation(self.size)
        out = self._gather(self._slots[: self.size][order])
        self.size = 0
        self._pieces, self._starts, self._rows = [], [], 0
        return out

    def _add(self, block: JaggedRows) -> int:
        base = self._rows
        self._pieces.append(block)
        self._starts.append(base)
        self._rows += len(block)
        return base

    def _gather(self, numbers: np.ndarray) -> JaggedRows:
        """The rows with these store numbers, in this order."""
        if len(self._pieces) == 1:
            return self._pieces[0].take(numbers)
        starts = np.asarray(self._starts, dtype=np.int64)
        piece = np.searchsorted(starts, numbers, side="right") - 1
        order = np.argsort(piece, kind="stable")
        sorted_piece = piece[order]
        parts = []
        for p in np.unique(sorted_piece):
            lo, hi = np.searchsorted(sorted_piece, [p, p + 1])
            parts.append(self._pieces[int(p)].take(numbers[order[lo:hi]] - starts[p]))
        joined = concat_jagged(parts)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return joined.take(inverse)

    def _compact(self) -> None:
        """One piece holding only the buffered rows (slot ``k`` is its row ``k``)."""
        kept = self._gather(self._slots[: self.size])
        self._pieces, self._starts, self._rows = [kept], [0], len(kept)
        self._slots[: self.size] = np.arange(self.size, dtype=np.int64)
