"""Rows of a stream into training batches: the seeded shuffle buffer, cutting rows into batches,
and one-hot rows as a TorchRec :class:`~compress.data.batches.Batch`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from compress.data.batches import Batch
from compress.data.jagged_rows import JaggedRows, jagged_to_batch
from compress.data.shuffle_draws import draw_overflow
from compress.data.stream_source import RowBlock, concat_blocks


class ShuffleBuffer:
    """A seeded shuffle buffer of at most ``capacity`` rows (see the module docstring).

    :meth:`push` takes a block and returns the rows it hands on (``None`` while filling);
    :meth:`drain` returns the remaining rows in a random order. ``max_size`` records the most rows
    it ever held (instrumentation for the memory bound). Rows move as whole records (each array
    viewed as one fixed-size item per row), a gather and a scatter per row and array.
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self.size = 0
        self.max_size = 0
        self._rows: RowBlock | None = None  # preallocated: capacity rows, never more

    def reset(self, rng: np.random.Generator) -> None:
        """Start a new pass: empty, drawing from ``rng`` (the arrays are kept)."""
        self.rng, self.size = rng, 0

    def push(self, block: RowBlock) -> RowBlock | None:
        m = len(block)
        if m == 0:
            return None
        if self.capacity == 0:  # no buffer: the block's own rows in a seeded random order
            order = self.rng.permutation(m)
            return _from_records([np.take(r, order) for r in _records(block)], block)
        rows = self._allocate(block)
        n, cap = self.size, self.capacity
        if n + m <= cap:
            for mine, theirs in zip(_records(rows), _records(block), strict=True):
                mine[n : n + m] = theirs
            self.size = n + m
            self.max_size = max(self.max_size, self.size)
            return None
        draw = draw_overflow(self.rng, n, m, cap)
        out = []
        for mine, theirs in zip(_records(rows), _records(block), strict=True):
            handed = np.empty(draw.count, dtype=mine.dtype)
            handed[draw.at_buffer] = np.take(mine, draw.buffer_rows)
            handed[draw.at_block] = np.take(theirs, draw.block_rows)
            mine[draw.slots] = np.take(theirs, draw.stay)
            out.append(handed)
        self.size = cap
        self.max_size = max(self.max_size, self.size)
        return _from_records(out, block)

    def drain(self) -> RowBlock | None:
        if self.size == 0 or self._rows is None:
            return None
        order = self.rng.permutation(self.size)
        out = [np.take(r, order) for r in _records(self._rows)]
        self.size = 0
        return _from_records(out, self._rows)

    def _allocate(self, block: RowBlock) -> RowBlock:
        if self._rows is None:
            self._rows = RowBlock(
                np.empty(self.capacity, np.float32),
                np.empty((self.capacity, block.dense.shape[1]), np.float32),
                np.empty((self.capacity, block.ids.shape[1]), np.int64),
            )
        return self._rows


def _records(block: RowBlock) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``block``'s arrays viewed as one record per row (no copy of C-ordered arrays)."""
    return tuple(_record_view(a) for a in (block.labels, block.dense, block.ids))  # type: ignore[return-value]


def _record_view(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    width = a.itemsize * (int(np.prod(a.shape[1:])) if a.ndim > 1 else 1)
    return a.reshape(a.shape[0], -1).view(np.dtype((np.void, width)))[:, 0]


def _from_records(records: list[np.ndarray], like: RowBlock) -> RowBlock:
    """A :class:`RowBlock` from record arrays shaped like ``like``'s arrays."""
    labels, dense, ids = (
        r.view(a.dtype).reshape((r.shape[0], *a.shape[1:]))
        for r, a in zip(records, (like.labels, like.dense, like.ids), strict=True)
    )
    return RowBlock(labels, dense, ids)


class Batcher:
    """Cuts a sequence of row chunks into batches of ``batch_size`` rows."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._pending: list[RowBlock] = []
        self._count = 0

    def add(self, rows: RowBlock | None) -> Iterator[RowBlock]:
        if rows is None or len(rows) == 0:
            return
        self._pending.append(rows)
        self._count += len(rows)
        if self._count < self.batch_size:
            return
        joined = concat_blocks(self._pending)
        full = self._count // self.batch_size
        rest = joined.tail(full * self.batch_size)
        self._pending, self._count = ([rest] if len(rest) else []), len(rest)
        for i in range(full):
            yield joined.tail(i * self.batch_size).head(self.batch_size)

    def flush(self) -> RowBlock | None:
        """The rows left (fewer than a batch), or ``None``; empties the batcher."""
        rest = concat_blocks(self._pending) if self._pending else None
        self._pending, self._count = [], 0
        return rest


def rows_to_batch(rows: RowBlock, feature_names: Sequence[str]) -> Batch:
    """A :class:`Batch` of one-hot rows; equal to ``Dataset.to_batch`` of the same rows
    (multi-hot rows: :func:`compress.data.jagged_rows.jagged_to_batch`)."""
    if isinstance(rows, JaggedRows):
        return jagged_to_batch(rows, feature_names)
    import torch  # here, not at import: the command line reads the loader settings without torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    n, f = rows.ids.shape
    values = np.ascontiguousarray(rows.ids.T).reshape(-1)
    sparse = KeyedJaggedTensor(
        keys=list(feature_names),
        values=torch.from_numpy(values),
        lengths=torch.ones(n * f, dtype=torch.int64),
        stride=n,
        length_per_key=[n] * f,
    )
    return Batch(
        dense=torch.from_numpy(np.array(rows.dense, copy=True, order="C")),
        sparse=sparse,
        labels=torch.from_numpy(np.array(rows.labels, copy=True)),
    )
