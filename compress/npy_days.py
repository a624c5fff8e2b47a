"""Reader for TorchRec's preprocessed Criteo day files (``BinaryCriteoUtils.tsv_to_npys`` output).

A directory holds, per day ``i``, three ``.npy`` files with one row per sample:

- ``day_{i}_dense.npy``: float ``[N, num_dense]``, already ``log(x + 3)``-transformed (kept as is),
- ``day_{i}_sparse.npy``: integer ``[N, num_sparse]`` raw categorical hashes,
- ``day_{i}_labels.npy``: integer ``[N, 1]`` (or ``[N]``) of 0/1.

Files are memory-mapped with ``allow_pickle=False``; sparse ids become table rows by
``id % num_embeddings`` (what TorchRec's ``hashes`` argument does). Days are read in numeric order
and concatenated into one in-memory :class:`~compress.dataset.Dataset`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from compress.dataset import Dataset, concat_datasets
from compress.errors import DataError

_DAY_DENSE = re.compile(r"day_(\d+)_dense\.npy")
PARTS = ("dense", "sparse", "labels")


def find_days(directory: str | Path) -> list[int]:
    """Day numbers ``i`` with a ``day_{i}_dense.npy`` in ``directory``, ascending."""
    d = Path(directory)
    days = [int(m.group(1)) for f in d.iterdir() if (m := _DAY_DENSE.fullmatch(f.name))]
    return sorted(days)


def day_paths(directory: str | Path, day: int) -> dict[str, Path]:
    """``{"dense": ..., "sparse": ..., "labels": ...}`` paths of one day."""
    return {part: Path(directory) / f"day_{day}_{part}.npy" for part in PARTS}


def read_npy_days(
    directory: str | Path,
    *,
    feature_names: Sequence[str],
    num_embeddings: Sequence[int],
    days: Sequence[int] | None = None,
) -> Dataset:
    """Read the given ``days`` (default: all found) of a TorchRec npy directory.

    Sparse column ``j`` becomes feature ``feature_names[j]`` with rows ``id % num_embeddings[j]``.
    Raises :class:`DataError` naming the file when one of a day's three files is missing or
    unreadable, when shapes or row counts disagree, or when a label is not 0/1.
    """
    if len(num_embeddings) != len(feature_names) or min(num_embeddings, default=1) < 1:
        raise ValueError("num_embeddings needs one positive row count per feature")
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a directory")
    chosen = find_days(d) if days is None else list(days)
    if not chosen:
        raise DataError(f"{d}: no day_<i>_dense.npy files")
    parts = [read_npy_day(d, day, feature_names, num_embeddings) for day in chosen]
    return concat_datasets(parts)


def read_npy_day(
    directory: Path, day: int, feature_names: Sequence[str], num_embeddings: Sequence[int]
) -> Dataset:
    """One day's three files as a :class:`Dataset` (see :func:`read_npy_days`)."""
    paths = day_paths(directory, day)
    for path in paths.values():
        if not path.is_file():
            raise DataError(f"{path}: missing (each day needs {', '.join(PARTS)} .npy files)")
    dense, sparse, labels = (_load(paths[p]) for p in PARTS)
    n = dense.shape[0] if dense.ndim else 0
    if dense.ndim != 2 or dense.dtype.kind != "f":
        raise DataError(f"{paths['dense']}: expected float [N, num_dense], got {_desc(dense)}")
    if sparse.ndim != 2 or sparse.dtype.kind not in "iu" or sparse.shape[1] != len(feature_names):
        raise DataError(
            f"{paths['sparse']}: expected integer [N, {len(feature_names)}], got {_desc(sparse)}"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.dtype.kind not in "iub":
        raise DataError(f"{paths['labels']}: expected integer [N, 1], got {_desc(labels)}")
    for part, arr in (("sparse", sparse), ("labels", labels)):
        if arr.shape[0] != n:
            raise DataError(f"{paths[part]}: {arr.shape[0]} rows but {paths['dense'].name} has {n}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise DataError(f"{paths['labels']}: labels must be 0 or 1")
    rows = table_rows(sparse, num_embeddings)
    offsets = np.arange(n + 1, dtype=np.int64)
    return Dataset(
        dense=np.array(dense, dtype=np.float32),
        labels=np.asarray(labels, dtype=np.float32),
        values={f: np.ascontiguousarray(rows[:, j]) for j, f in enumerate(feature_names)},
        offsets={f: offsets for f in feature_names},
    )


def table_rows(ids: np.ndarray, num_embeddings: Sequence[int]) -> np.ndarray:
    """int64 ``ids % num_embeddings`` per column (unsigned ids stay unsigned through the modulo)."""
    if ids.dtype.kind == "u":
        return (ids.astype(np.uint64) % np.asarray(num_embeddings, np.uint64)).astype(np.int64)
    return ids.astype(np.int64) % np.asarray(num_embeddings, dtype=np.int64)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot be read as a .npy array ({e})") from None


def _desc(arr: np.ndarray) -> str:
    return f"{arr.dtype} {list(arr.shape)}"
