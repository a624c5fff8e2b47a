"""In-process TorchRec batches as data: an iterable of ``Batch``-like objects, streamed.

The Python API takes, as ``data`` or ``valid``, batches a TorchRec pipeline already makes:

- :class:`compress.data.batches.Batch` (``dense``, ``sparse``, ``labels``), or
  ``torchrec.datasets.utils.Batch`` (``dense_features``, ``sparse_features``, ``labels``), or any
  object with either set of attributes;
- ``dense``: float ``[B, num_dense]`` (already transformed: the model's inputs); ``sparse``: a
  ``KeyedJaggedTensor`` over ``B`` samples holding every feature of the model (other keys are
  ignored; bags of any size, no weights); ``labels``: ``[B]`` or ``[B, 1]`` of 0/1.

The data must be **re-iterable** (a list, a ``DataLoader``, any object whose ``iter()`` starts
again) or a function that returns a fresh iterator: fine-tuning reads it several times and
evaluation once more, like a file. A bare iterator or generator (read once) is refused.

:func:`index_batches` reads it once: every batch is checked (a batch of the wrong kind, a missing
feature, a shape that disagrees, a negative id or one beyond its table, a label other than 0/1, a
NaN/inf dense value is a :class:`DataError` naming the batch and the feature), its rows counted
and its content hashed. After that the batches are **blocks** of a stream
(:mod:`compress.data.stream`): cut into the training batch size, shuffled through the same seeded
buffer as files, split into held-out tail and validation slices by row number, and read in this
process (they cannot be sent to worker processes). Each later pass must yield the same batches:
one that differs from the first pass (a ``DataLoader`` with ``shuffle=True``) is a
:class:`DataError` naming it (the training loop shuffles by itself). Memory holds one batch of the
caller's at a time, plus the shuffle buffer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from compress.data.jagged_rows import JaggedRows
from compress.data.stream_source import BlockFiles, RowBlock, Task
from compress.errors import DataError

#: How in-process batches are named in messages and reports.
BATCHES_NAME = "<in-process batches>"

Batches = Iterable[Any] | Callable[[], Iterable[Any]]


def is_batches(data: object) -> bool:
    """Whether ``data`` is given as in-process batches (not a path, not a dataset)."""
    import os

    from compress.data.dataset import Dataset

    if data is None or isinstance(data, str | bytes | os.PathLike | Dataset):
        return False
    return callable(data) or isinstance(data, Iterable)


@dataclass(frozen=True)
class BatchBlock:
    """The caller's batch number ``index`` (counted from 0 in each pass), of ``lines`` rows."""

    index: int
    lines: int


@dataclass(frozen=True)
class _Parts:
    """One batch as arrays: ``dense`` float32 ``[B, D]``, ``labels`` float32 ``[B]``, per model
    feature ``(lengths int64 [B], values int64)``, and the sha256 of all of them."""

    dense: np.ndarray
    labels: np.ndarray
    sparse: tuple[tuple[np.ndarray, np.ndarray], ...]
    digest: bytes


class BatchSource:
    """Indexed in-process batches (module docstring); read in this process only
    (``in_process``)."""

    exact_rows = True
    in_process = True

    def __init__(
        self,
        batches: Batches,
        *,
        feature_names: tuple[str, ...],
        num_embeddings: tuple[int, ...],
        num_dense: int,
        dense_transform: str | None,
        name: str,
        blocks: tuple[BatchBlock, ...],
        digests: tuple[bytes, ...],
        one_hot: tuple[str, ...],
    ) -> None:
        self.batches = batches
        self.feature_names = feature_names
        self.num_embeddings = num_embeddings
        self.num_dense = num_dense
        self.dense_transform = dense_transform
        self.name = name
        self.blocks = blocks
        self.digests = digests
        self.one_hot = one_hot

    @property
    def jagged(self) -> bool:
        """Whether blocks read to :class:`JaggedRows` (some feature had a bag of other than one
        id)."""
        return len(self.one_hot) != len(self.feature_names)

    def describe(self) -> dict:
        """What the rows are made of, for fingerprints: every batch's content, in order."""
        return {
            "format": "batches",
            "sha256": hashlib.sha256(b"".join(self.digests)).hexdigest(),
            "dense_transform": self.dense_transform,
            "num_embeddings": list(self.num_embeddings),
        }

    def read(self, task: Task, files: BlockFiles) -> RowBlock | JaggedRows:
        """The rows of one task: batch ``task.block`` of a pass, rows ``task.lo:task.hi``."""
        key = ("batches", id(self))
        cursor = files.state.get(key)
        if cursor is None or cursor.next_index > task.block:
            cursor = _Cursor(self)
            files.state[key] = cursor
        parts = parse_batch(cursor.get(task.block), task.block, self)
        if parts.digest != self.digests[task.block]:
            raise DataError(
                f"{self.name}: batch {task.block} differs from the first pass; the batches must "
                "be the same on every pass (no shuffling DataLoader: fine-tuning shuffles by "
                "itself)"
            )
        rows = self._rows(parts)
        if task.lo or task.hi < len(rows):
            rows = rows.tail(task.lo).head(task.hi - task.lo)
        return rows

    def _rows(self, parts: _Parts) -> RowBlock | JaggedRows:
        n = len(parts.labels)
        if not self.jagged:
            ids = np.empty((n, len(parts.sparse)), dtype=np.int64)
            for j, (_, values) in enumerate(parts.sparse):
                ids[:, j] = values
            return RowBlock(labels=parts.labels, dense=parts.dense, ids=ids)
        lengths = np.stack([ln for ln, _ in parts.sparse], axis=1).astype(np.int64, copy=False)
        bag_offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths.T.reshape(-1), out=bag_offsets[1:])  # feature-major, as given
        f = len(parts.sparse)
        order = (np.arange(n, dtype=np.int64)[:, None] + np.arange(f)[None, :] * n).reshape(-1)
        from compress.data.dataset import take_jagged

        flat = np.concatenate([v for _, v in parts.sparse]) if f else np.zeros(0, np.int64)
        values, _ = take_jagged(flat, bag_offsets, order)
        return JaggedRows(labels=parts.labels, dense=parts.dense, lengths=lengths, values=values)


class _Cursor:
    """One pass over the caller's batches, moving forward only."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source
        self._it: Iterator[Any] = fresh_iterator(source.batches, source.name)
        self.next_index = 0

    def get(self, index: int) -> Any:
        """Batch ``index`` of this pass (the ones before it are skipped unread)."""
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                raise DataError(
                    f"{self.source.name}: a pass ended after {self.next_index} batches, the first "
                    f"pass had {len(self.source.blocks)}; the batches must be the same on every "
                    "pass"
                ) from None
            self.next_index += 1
            if self.next_index - 1 == index:
                return batch

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def fresh_iterator(batches: Batches, name: str) -> Iterator[Any]:
    """A new pass over ``batches``: ``iter(batches)``, or ``iter(batches())`` for a function."""
    if callable(batches) and not isinstance(batches, Iterable):
        produced = batches()
        if not isinstance(produced, Iterable):
            raise DataError(
                f"{name}: the function given as data returned a {type(produced).__name__}, not "
                "an iterable of batches"
            )
        return iter(produced)
    return iter(batches)  # type: ignore[arg-type]


def index_batches(
    batches: Batches,
    *,
    feature_names: Sequence[str],
    num_embeddings: Sequence[int],
    num_dense: int,
    dense_transform: str | None = None,
    name: str = BATCHES_NAME,
) -> BatchSource:
    """Read ``batches`` once (module docstring): check each, count its rows, hash it."""
    if not callable(batches) and iter(batches) is batches:  # type: ignore[arg-type]
        raise DataError(
            f"{name}: an iterator can be read only once, and fine-tuning reads its data several "
            "times: pass a list, a DataLoader or another re-iterable, or a function that returns "
            "a fresh iterator"
        )
    features = tuple(feature_names)
    probe = _Probe(features, tuple(int(n) for n in num_embeddings), num_dense, name)
    blocks, digests = [], []
    one_hot = [True] * len(features)
    it = fresh_iterator(batches, name)
    try:
        for index, batch in enumerate(it):
            parts = parse_batch(batch, index, probe)
            blocks.append(BatchBlock(index, len(parts.labels)))
            digests.append(parts.digest)
            for j, (lengths, _) in enumerate(parts.sparse):
                one_hot[j] = one_hot[j] and bool((lengths == 1).all())
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    if not blocks or not sum(b.lines for b in blocks):
        raise DataError(f"{name}: no samples")
    return BatchSource(
        batches,
        feature_names=features,
        num_embeddings=probe.num_embeddings,
        num_dense=num_dense,
        dense_transform=dense_transform,
        name=name,
        blocks=tuple(blocks),
        digests=tuple(digests),
        one_hot=tuple(f for f, one in zip(features, one_hot, strict=True) if one),
    )


@dataclass(frozen=True)
class _Probe:
    """What a batch is checked against."""

    feature_names: tuple[str, ...]
    num_embeddings: tuple[int, ...]
    num_dense: int
    name: str


def parse_batch(batch: Any, index: int, shape: _Probe | BatchSource) -> _Parts:
    """One batch as arrays, checked against the model (module docstring)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    where = f"{shape.name}: batch {index}"
    if hasattr(batch, "dense_features") and hasattr(batch, "sparse_features"):
        dense, sparse = batch.dense_features, batch.sparse_features
    elif hasattr(batch, "dense") and hasattr(batch, "sparse"):
        dense, sparse = batch.dense, batch.sparse
    else:
        raise DataError(
            f"{where} is a {type(batch).__name__}; expected a batch with dense, sparse (a "
            "KeyedJaggedTensor) and labels, or a torchrec.datasets.utils.Batch"
        )
    labels = getattr(batch, "labels", None)
    if not isinstance(sparse, KeyedJaggedTensor):
        raise DataError(f"{where}: sparse is a {type(sparse).__name__}, not a KeyedJaggedTensor")
    for what, t in (("dense", dense), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise DataError(f"{where}: {what} is a {type(t).__name__}, not a torch.Tensor")
    if dense.dim() != 2 or dense.shape[1] != shape.num_dense or not dense.is_floating_point():
        raise DataError(
            f"{where}: dense is {dense.dtype} {list(dense.shape)}, the model takes float "
            f"[batch, {shape.num_dense}]"
        )
    b = int(dense.shape[0])
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1 or labels.shape[0] != b:
        raise DataError(f"{where}: labels have shape {list(labels.shape)}, expected [{b}]")
    dense_np = dense.detach().cpu().to(torch.float32).numpy()
    bad = ~np.isfinite(dense_np)
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        raise DataError(
            f"{where}: dense value {dense_np[i, j].item()!r} at sample {i}, column {j} is not finite"
        )
    labels_np = labels.detach().cpu().to(torch.float32).numpy()
    not_label = (labels_np != 0) & (labels_np != 1)
    if not_label.any():
        i = int(np.argmax(not_label))
        raw = labels.detach().cpu()[i].item()
        raise DataError(f"{where}: label {raw!r} at sample {i} is not a label (0 or 1)")
    if sparse.weights_or_none() is not None:
        raise DataError(f"{where}: sparse has weights; weighted features are not supported")
    keys = list(sparse.keys())
    missing = [f for f in shape.feature_names if f not in keys]
    if missing:
        raise DataError(
            f"{where}: sparse has no feature {missing[0]!r}"
            + (f" (nor {', '.join(map(repr, missing[1:4]))})" if len(missing) > 1 else "")
            + f"; the model reads {list(shape.feature_names)}, the batch holds {keys}"
        )
    if sparse.stride() != b:
        raise DataError(f"{where}: sparse holds {sparse.stride()} samples, dense holds {b}")
    per_key = sparse.to_dict()
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(dense_np).tobytes())
    digest.update(np.ascontiguousarray(labels_np).tobytes())
    out = []
    for f, rows in zip(shape.feature_names, shape.num_embeddings, strict=True):
        jt = per_key[f]
        lengths_t, values_t = jt.lengths(), jt.values()
        if values_t.is_floating_point() or values_t.dtype == torch.bool:
            raise DataError(f"{where}: feature {f!r} holds {values_t.dtype} ids, not integers")
        lengths = lengths_t.detach().cpu().to(torch.int64).numpy()
        values = values_t.detach().cpu().to(torch.int64).numpy()
        if lengths.size and lengths.min() < 0:
            raise DataError(f"{where}: feature {f!r} has a negative bag length")
        if int(lengths.sum()) != values.size:
            raise DataError(
                f"{where}: feature {f!r}: lengths add up to {int(lengths.sum())}, it holds "
                f"{values.size} ids"
            )
        if values.size and values.min() < 0:
            k = int(np.argmax(values < 0))
            raise DataError(
                f"{where}: feature {f!r} holds a negative id {int(values[k])} (sample "
                f"{_sample(lengths, k)}); ids must be non-negative"
            )
        if values.size and values.max() >= rows:
            k = int(np.argmax(values >= rows))
            raise DataError(
                f"{where}: feature {f!r} holds id {int(values[k])} (sample {_sample(lengths, k)}), "
                f"beyond its table's {rows} rows"
            )
        digest.update(lengths.tobytes())
        digest.update(values.tobytes())
        out.append((lengths, values))
    return _Parts(dense_np, labels_np, tuple(out), digest.digest())


def _sample(lengths: np.ndarray, k: int) -> int:
    """The sample whose bag holds id number ``k`` of a feature."""
    return int(np.searchsorted(np.cumsum(lengths), k, side="right"))
