"""An in-memory dataset of click samples and the project's ``.npz`` file format.

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
(no Python loop per sample).

Project file format (``save_npz`` / ``load_npz``), an uncompressed ``np.savez`` archive of plain
arrays, read back with ``allow_pickle=False``:

=====================  ==========================================================================
key                    array
=====================  ==========================================================================
``meta``               0-d unicode string: JSON ``{"format": "dqrm-compress-dataset", "version": 1,
                       "feature_names": [...], "dense_transform": "log3"}`` (the feature order;
                       ``dense_transform`` only when known, absent in files written before it)
``dense``              float32 ``[N, num_dense]``
``labels``             float32 ``[N]``
``click_prob``         float64 ``[N]`` (only for generated data)
``values/<feature>``   int64 flat rows of that feature
``offsets/<feature>``  int64 ``[N + 1]``
=====================  ==========================================================================

Example::

    ds = Dataset(dense=np.zeros((2, 1), np.float32), labels=np.array([0, 1], np.float32),
                 values={"cat_0": np.array([3, 4, 5])}, offsets={"cat_0": np.array([0, 1, 3])})
    batch = next(ds.batches(2, feature_names=("cat_0",)))  # batch.sparse["cat_0"].lengths() == [1, 2]
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compress.data.batches import Batch
from compress.data.dense_transform import DENSE_TRANSFORMS, check_transform
from compress.errors import DataError

FORMAT_NAME = "dqrm-compress-dataset"
FORMAT_VERSION = 1


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
        :class:`DataError` when either side would be empty.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
        n = len(self)
        n_valid = int(round(n * fraction))
        if n_valid == 0 or n_valid == n:
            raise DataError(
                f"cannot hold out {fraction:g} of {n} samples: train and valid would not both be "
                "non-empty"
            )
        return self.slice(0, n - n_valid), self.slice(n - n_valid, n)

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields."""
        _check_batch_size(batch_size)
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

    def save_npz(self, path: str | Path) -> None:
        """Write the project ``.npz`` format (module docstring) to exactly ``path``."""
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "feature_names": list(self.feature_names),
        }
        if self.dense_transform is not None:
            meta["dense_transform"] = self.dense_transform
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(json.dumps(meta)),
            "dense": self.dense,
            "labels": self.labels,
        }
        if self.click_prob is not None:
            arrays["click_prob"] = self.click_prob
        for f in self.feature_names:
            arrays[f"values/{f}"] = self.values[f]
            arrays[f"offsets/{f}"] = self.offsets[f]
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load_npz(cls, path: str | Path) -> Dataset:
        """Read a file written by :meth:`save_npz`; any deviation is a :class:`DataError` naming the
        key: a missing or extra key, a wrong dtype or shape, a NaN/inf dense value, a label other
        than 0/1, a negative row id (object arrays are never unpickled)."""
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: not a readable .npz archive ({e})") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single .npy array, not a dqrm-compress .npz dataset")
        with archive:
            arrays = _read_archive(archive, path)
        feature_names, transform = _parse_meta(arrays.pop("meta"), path)
        _check_keys(set(arrays), feature_names, "click_prob" in arrays, path)
        for key, arr in arrays.items():
            _check_dtype(key, arr, path)
        _check_contents(arrays, path)
        try:
            return cls(
                dense=arrays["dense"],
                labels=arrays["labels"],
                values={f: arrays[f"values/{f}"] for f in feature_names},
                offsets={f: arrays[f"offsets/{f}"] for f in feature_names},
                click_prob=arrays.get("click_prob"),
                dense_transform=transform,
            )
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None

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
    return torch.from_numpy(np.array(a, copy=True, order="C"))


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def _read_archive(archive: np.lib.npyio.NpzFile, path: str | Path) -> dict[str, np.ndarray]:
    arrays = {}
    for key in archive.files:
        try:
            arrays[key] = archive[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: key {key!r} cannot be read ({e})") from None
    if "meta" not in arrays:
        raise DataError(f"{path}: no 'meta' key, not a dqrm-compress .npz dataset")
    return arrays


def _parse_meta(meta: np.ndarray, path: str | Path) -> tuple[tuple[str, ...], str | None]:
    """``(feature names, dense transform or None)`` from the ``meta`` key."""
    if meta.dtype.kind != "U" or meta.shape != ():
        raise DataError(f"{path}: key 'meta' must be a JSON string, got {meta.dtype} {meta.shape}")
    try:
        info = json.loads(meta.item())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: key 'meta' is not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: key 'meta' does not name format {FORMAT_NAME!r}")
    version = info.get("version")
    if not isinstance(version, int) or version < 1:
        raise DataError(f"{path}: key 'meta' has no valid format version")
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: dataset format version {version} is newer than this dqrm-compress "
            f"supports ({FORMAT_VERSION})"
        )
    names = info.get("feature_names")
    if not isinstance(names, list) or not all(isinstance(f, str) and f for f in names):
        raise DataError(f"{path}: key 'meta' needs 'feature_names', a list of non-empty strings")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: key 'meta' lists a feature name twice")
    transform = info.get("dense_transform")
    if transform is not None:
        check_transform(transform, f"{path}: key 'meta' dense_transform")
    return tuple(names), transform


def _check_keys(
    keys: set[str], feature_names: tuple[str, ...], has_click_prob: bool, path: str | Path
) -> None:
    expected = {"dense", "labels"} | {
        f"{kind}/{f}" for f in feature_names for kind in ("values", "offsets")
    }
    if has_click_prob:
        expected.add("click_prob")
    for key in sorted(expected - keys):
        raise DataError(f"{path}: missing key {key!r}")
    for key in sorted(keys - expected):
        raise DataError(f"{path}: unexpected key {key!r} (not a feature listed in 'meta')")


_DTYPES = {"dense": np.float32, "labels": np.float32, "click_prob": np.float64}


def _check_contents(arrays: dict[str, np.ndarray], path: str | Path) -> None:
    """Raise :class:`DataError` naming the key and position of a NaN/inf dense value, a label that
    is not 0/1, or a ``click_prob`` outside [0, 1]."""
    problems = (
        ("dense", find_nonfinite(arrays["dense"])),
        ("labels", find_nonbinary(arrays["labels"])),
    )
    if "click_prob" in arrays:
        prob = arrays["click_prob"]
        outside = ~((prob >= 0) & (prob <= 1))  # NaN too
        problems += (
            ("click_prob", describe_first(prob, outside, "is not a probability in [0, 1]")),
        )
    for key, problem in problems:
        if problem is not None:
            raise DataError(f"{path}: key {key!r}: {problem}")


def find_nonfinite(arr: np.ndarray) -> str | None:
    """Where ``arr`` (float) first holds NaN or +-inf, in words (``"value nan at sample 3, column 1
    is not finite"``), or None when every value is finite."""
    return describe_first(arr, ~np.isfinite(arr), "is not finite")


def find_nonbinary(arr: np.ndarray, start: int = 0) -> str | None:
    """Where ``arr`` first holds a label other than 0 or 1 (NaN included), in words, or None
    (``start``: the sample number of ``arr[0]``, for a part of a file)."""
    return describe_first(arr, (arr != 0) & (arr != 1), "is not a label (0 or 1)", start)


def describe_first(arr: np.ndarray, bad: np.ndarray, what: str, start: int = 0) -> str | None:
    """``"value <v> at sample i[, column j] <what>"`` for the first True of ``bad`` (``v`` read
    from ``arr``; ``i`` counted from ``start``, the sample number of ``arr[0]``), or None when
    ``bad`` holds no True."""
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where = (index[0] + start, *index[1:])
    return f"value {arr[index].item()!r} at {describe_position(where)} {what}"


def describe_position(index: tuple[int, ...]) -> str:
    """``(3,)`` -> ``"sample 3"``, ``(3, 1)`` -> ``"sample 3, column 1"`` (0-based, as numpy)."""
    if len(index) == 1:
        return f"sample {index[0]}"
    if len(index) == 2:
        return f"sample {index[0]}, column {index[1]}"
    return f"index {index}"


def _check_dtype(key: str, arr: np.ndarray, path: str | Path) -> None:
    want = np.dtype(_DTYPES.get(key, np.int64))
    if arr.dtype != want:
        raise DataError(f"{path}: key {key!r} has dtype {arr.dtype}, expected {want}")
