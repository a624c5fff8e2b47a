"""An in-memory dataset of click samples, and the batches a TorchRec DLRM reads from it.

A :class:`Dataset` holds plain numpy arrays for ``N`` samples:

- ``dense``: float32 ``[N, num_dense]``, already transformed (e.g. ``log(x + 3)`` for Criteo),
- ``labels``: float32 ``[N]`` of 0/1,
- per sparse feature a jagged pair ``values[f]`` (int64, flat table rows of every bag in sample
  order) and ``offsets[f]`` (int64 ``[N + 1]``; sample ``i`` owns
  ``values[f][offsets[f][i]:offsets[f][i + 1]]``),
- optionally ``click_prob``: float64 ``[N]``, the true click probability of generated data,
- ``dense_transform``: the name of the transform that made ``dense`` from raw counts (``"log3"``,
  ``"none"``; see :mod:`compress.data.dense_transform`), ``None`` when not known.

Every reader (:mod:`compress.data.criteo_text`, :mod:`compress.data.criteo_npy`, :mod:`compress.data.synthetic`) returns
one, and :meth:`Dataset.batches` turns it into :class:`~compress.data.batches.Batch` objects whose
``KeyedJaggedTensor`` goes straight into a TorchRec DLRM. Batches are gathered with vectorized numpy
(no Python loop per sample). The project's own file of a dataset is :mod:`compress.data.npz`.

Example::

    ds = Dataset(dense=np.zeros((2, 1), np.float32), labels=np.array([0, 1], np.float32),
                 values={"cat_0": np.array([3, 4, 5])}, offsets={"cat_0": np.array([0, 1, 3])})
    batch = next(ds.batches(2, feature_names=("cat_0",)))  # batch.sparse["cat_0"].lengths() == [1, 2]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from compress.data.dense_transform import DENSE_TRANSFORMS
from compress.errors import DataError

if TYPE_CHECKING:
    import torch

    from compress.data.batches import Batch


@dataclass(eq=False, repr=False)
class Dataset:
    """Samples as numpy arrays; see the module docstring for shapes. Arrays are treated as read-only.

    The constructor converts ``dense`` and ``labels`` to float32, ``values``/``offsets`` (which must
    be integer arrays) to int64 and ``click_prob`` to float64, and raises ``ValueError`` when shapes
    disagree, an offsets array is not a valid prefix sum, or a row id is negative. Feature order is
    the insertion order of ``values``.
    """

    dense: np.ndarray
    labels: np.ndarray
    values: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]
    click_prob: np.ndarray | None = None
    dense_transform: str | None = None

    def __post_init__(self) -> None:
        if self.dense_transform is not None and self.dense_transform not in DENSE_TRANSFORMS:
            raise ValueError(
                f"dense_transform must be one of {DENSE_TRANSFORMS} or None, "
                f"got {self.dense_transform!r}"
            )
        self.dense = np.asarray(self.dense, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.float32)
        self.values = {f: _as_int64(v, f"values[{f!r}]") for f, v in self.values.items()}
        self.offsets = {f: _as_int64(o, f"offsets[{f!r}]") for f, o in self.offsets.items()}
        if self.click_prob is not None:
            self.click_prob = np.asarray(self.click_prob, dtype=np.float64)
        problem = _find_problem(self)
        if problem is not None:
            raise ValueError(problem)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        extra = ", click_prob" if self.click_prob is not None else ""
        return (
            f"Dataset(n={len(self)}, num_dense={self.num_dense}, "
            f"features={list(self.feature_names)}{extra})"
        )

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Sparse feature names in stored order."""
        return tuple(self.values)

    @property
    def num_dense(self) -> int:
        return int(self.dense.shape[1])

    def lengths(self, feature: str) -> np.ndarray:
        """Bag sizes ``[N]`` of one feature."""
        return np.diff(self.offsets[feature])

    def take(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """The samples at ``indices`` (integers in ``[0, N)``, any order, repeats allowed)."""
        raw = np.asarray(indices)
        if raw.size and raw.dtype.kind not in "iu":
            raise TypeError(f"sample indices must be integers, got {raw.dtype}")
        idx = raw.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        values, offsets = {}, {}
        for f in self.feature_names:
            values[f], offsets[f] = take_jagged(self.values[f], self.offsets[f], idx)
        return Dataset(
            dense=self.dense[idx],
            labels=self.labels[idx],
            values=values,
            offsets=offsets,
            click_prob=None if self.click_prob is None else self.click_prob[idx],
            dense_transform=self.dense_transform,
        )

    def slice(self, start: int, stop: int) -> Dataset:
        """Samples ``start`` to ``stop - 1`` (clamped to ``[0, N]``, like Python slicing); shares memory."""
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        values, offsets = {}, {}
        for f in self.feature_names:
            off = self.offsets[f]
            values[f] = self.values[f][off[start] : off[stop]]
            offsets[f] = off[start : stop + 1] - off[start]
        return Dataset(
            dense=self.dense[start:stop],
            labels=self.labels[start:stop],
            values=values,
            offsets=offsets,
            click_prob=None if self.click_prob is None else self.click_prob[start:stop],
            dense_transform=self.dense_transform,
        )

    def split_tail(self, fraction: float) -> tuple[Dataset, Dataset]:
        """``(train, valid)``: the last ``round(N * fraction)`` samples are held out, in file order.

        A tail split, not a random one: Criteo files are ordered by time, and evaluating on the most
        recent samples is how the Criteo benchmarks hold data out. Generated data is i.i.d., so the
        tail is as good as any subset. Raises ``ValueError`` unless ``0 < fraction < 1`` and
        :class:`DataError` when either side would be empty (:func:`tail_start`).
        """
        start = tail_start(len(self), fraction)
        return self.slice(0, start), self.slice(start, len(self))

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields."""
        check_batch_size(batch_size)
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        feature_names: Sequence[str],
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Yield :class:`Batch` objects of ``batch_size`` samples (the last one smaller unless
        ``drop_last``). ``feature_names`` are the KJT keys in the model's order; the dataset may hold
        more features than that. With ``shuffle`` the order is ``default_rng(seed).permutation(N)``,
        so the same seed gives the same batches (pass ``seed + epoch`` for a new order each epoch).
        """
        keys = self._check_features(feature_names)
        n = len(self)
        n_batches = self.num_batches(batch_size, drop_last=drop_last)
        order = np.random.default_rng(seed).permutation(n) if shuffle else None
        for b in range(n_batches):
            start, stop = b * batch_size, min(n, (b + 1) * batch_size)
            part = self.slice(start, stop) if order is None else self.take(order[start:stop])
            yield part.to_batch(keys)

    def to_batch(self, feature_names: Sequence[str]) -> Batch:
        """All samples as one :class:`Batch` whose KJT keys are ``feature_names`` in that order."""
        import torch  # here, not at import: serving datasets with ONNX Runtime needs no torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        from compress.data.batches import Batch

        keys = self._check_features(feature_names)
        parts = [self.values[f] for f in keys]
        values = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        lengths = np.concatenate([self.lengths(f) for f in keys]) if keys else np.zeros(0, np.int64)
        # length_per_key comes from numpy: KJT would otherwise compute it with a torch reduction.
        sparse = KeyedJaggedTensor(
            keys=list(keys),
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(lengths),
            stride=len(self),
            length_per_key=[int(p.shape[0]) for p in parts],
        )
        return Batch(dense=_tensor(self.dense), sparse=sparse, labels=_tensor(self.labels))

    def select_features(self, feature_names: Sequence[str]) -> Dataset:
        """The same samples with only ``feature_names``, in that order (arrays are shared)."""
        keys = self._check_features(feature_names)
        return Dataset(
            dense=self.dense,
            labels=self.labels,
            values={f: self.values[f] for f in keys},
            offsets={f: self.offsets[f] for f in keys},
            click_prob=self.click_prob,
            dense_transform=self.dense_transform,
        )

    def equals(self, other: Dataset) -> bool:
        """True when both hold identical arrays (dtype and values) and the same feature order."""
        if self.feature_names != other.feature_names:
            return False
        if (self.click_prob is None) != (other.click_prob is None):
            return False
        pairs = [(self.dense, other.dense), (self.labels, other.labels)]
        if self.click_prob is not None:
            pairs.append((self.click_prob, other.click_prob))
        for f in self.feature_names:
            pairs += [(self.values[f], other.values[f]), (self.offsets[f], other.offsets[f])]
        return all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in pairs)

    def _check_features(self, feature_names: Sequence[str]) -> tuple[str, ...]:
        keys = tuple(feature_names)
        for f in keys:
            if f not in self.values:
                raise DataError(
                    f"dataset has no sparse feature {f!r} (it has {list(self.feature_names)})"
                )
        if len(set(keys)) != len(keys):
            raise ValueError(f"feature names repeat: {list(keys)}")
        return keys


def tail_start(n: int, fraction: float) -> int:
    """Where the held-out tail of ``n`` samples starts when ``round(n * fraction)`` of them are
    held out. ``ValueError`` unless ``0 < fraction < 1``; :class:`DataError` when either side would
    be empty."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    n_valid = int(round(n * fraction))
    if n_valid == 0 or n_valid == n:
        raise DataError(
            f"cannot hold out {fraction:g} of {n} samples: train and valid would not both be "
            "non-empty"
        )
    return n - n_valid


def take_jagged(
    values: np.ndarray, offsets: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gather bags ``idx`` of a jagged ``(values, offsets)`` pair; returns the new pair.

    Vectorized: each kept value's source position is its bag's start plus its rank inside the bag.
    """
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    new_offsets = np.zeros(idx.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    total = int(new_offsets[-1])
    if total == idx.size and (lengths == 1).all():
        return values[starts], new_offsets
    positions = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(total, dtype=np.int64)
    return values[positions], new_offsets


def concat_datasets(parts: Sequence[Dataset]) -> Dataset:
    """Samples of ``parts`` one after another; all must share features, order and dense width."""
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    for p in parts[1:]:
        if p.feature_names != first.feature_names or p.num_dense != first.num_dense:
            raise ValueError("datasets to concatenate differ in features or dense width")
        if (p.click_prob is None) != (first.click_prob is None):
            raise ValueError("datasets to concatenate differ in having click_prob")
        if p.dense_transform != first.dense_transform:
            raise ValueError("datasets to concatenate differ in their dense transform")
    if len(parts) == 1:
        return first
    values, offsets = {}, {}
    for f in first.feature_names:
        values[f] = np.concatenate([p.values[f] for p in parts])
        bases = np.cumsum([0] + [int(p.offsets[f][-1]) for p in parts[:-1]])
        offsets[f] = np.concatenate(
            [first.offsets[f][:1]]
            + [p.offsets[f][1:] + b for p, b in zip(parts, bases, strict=True)]
        )
    return Dataset(
        dense=np.concatenate([p.dense for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        values=values,
        offsets=offsets,
        click_prob=(
            None if first.click_prob is None else np.concatenate([p.click_prob for p in parts])
        ),
        dense_transform=first.dense_transform,
    )


def _as_int64(arr: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what} must be an integer array, got {a.dtype}")
    return a.astype(np.int64, copy=False)


def _find_problem(ds: Dataset) -> str | None:
    """First inconsistency in ``ds``'s arrays, as a message, or None."""
    if ds.dense.ndim != 2:
        return f"dense must be 2-D [N, num_dense], got shape {ds.dense.shape}"
    if ds.labels.ndim != 1:
        return f"labels must be 1-D [N], got shape {ds.labels.shape}"
    n = ds.labels.shape[0]
    if ds.dense.shape[0] != n:
        return f"dense has {ds.dense.shape[0]} rows but labels has {n}"
    if ds.click_prob is not None and ds.click_prob.shape != (n,):
        return f"click_prob has shape {ds.click_prob.shape}, expected ({n},)"
    if list(ds.values) != list(ds.offsets):
        return f"values features {list(ds.values)} differ from offsets features {list(ds.offsets)}"
    for f in ds.values:
        values, offsets = ds.values[f], ds.offsets[f]
        if values.ndim != 1:
            return f"values[{f!r}] must be 1-D, got shape {values.shape}"
        if offsets.shape != (n + 1,):
            return f"offsets[{f!r}] has shape {offsets.shape}, expected ({n + 1},)"
        if offsets[0] != 0 or offsets[-1] != values.shape[0]:
            return (
                f"offsets[{f!r}] must start at 0 and end at len(values)={values.shape[0]}, "
                f"got {offsets[0]}..{offsets[-1]}"
            )
        if n and (np.diff(offsets) < 0).any():
            return f"offsets[{f!r}] decrease"
        if values.size and values.min() < 0:
            return f"values[{f!r}] holds a negative row id {values.min()}"
    return None


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over a fresh C-ordered copy of ``a``: a batch never aliases the dataset's memory."""
    import torch

    return torch.from_numpy(np.array(a, copy=True, order="C"))


def check_batch_size(batch_size: int) -> None:
    """``ValueError`` unless ``batch_size`` is at least 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
