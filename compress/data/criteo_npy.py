"""Reader for TorchRec's preprocessed Criteo day files (``BinaryCriteoUtils.tsv_to_npys`` output).

A directory holds, per day ``i``, three ``.npy`` files with one row per sample:

- ``day_{i}_dense.npy``: float ``[N, num_dense]``, already ``log(x + 3)``-transformed (kept as is,
  recorded as the ``log3`` transform),
- ``day_{i}_sparse.npy``: integer ``[N, num_sparse]`` raw categorical hashes,
- ``day_{i}_labels.npy``: integer ``[N, 1]`` (or ``[N]``) of 0/1.

Files are memory-mapped with ``allow_pickle=False``; sparse ids become table rows by
``id % num_embeddings`` (what TorchRec's ``hashes`` argument does); a negative id, a NaN/inf dense
value or a label other than 0/1 is a :class:`~compress.errors.DataError` naming file, sample and
column. Days are read in numeric order
and concatenated into one in-memory :class:`~compress.data.dataset.Dataset`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compress.data.value_checks import describe_first, find_nonbinary
from compress.errors import DataError

if TYPE_CHECKING:  # reading rows stays free of torch: stream workers import only numpy
    from compress.data.dataset import Dataset

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
    num_dense: int | None = None,
) -> Dataset:
    """Read the given ``days`` (default: all found) of a TorchRec npy directory.

    Sparse column ``j`` becomes feature ``feature_names[j]`` with rows ``id % num_embeddings[j]``.
    Raises :class:`DataError` naming the file (and the sample and column) when one of a day's three
    files is missing or unreadable, when shapes or row counts disagree (or the dense width is not
    ``num_dense``, when given), when a dense value is NaN/inf (or beyond float32), a sparse id is
    negative, or a label is not 0/1. Ids beyond a table are hashes and take the modulo.
    """
    if len(num_embeddings) != len(feature_names) or min(num_embeddings, default=1) < 1:
        raise ValueError("num_embeddings needs one positive row count per feature")
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a directory")
    chosen = find_days(d) if days is None else list(days)
    if not chosen:
        raise DataError(f"{d}: no day_<i>_dense.npy files")
    parts = [read_npy_day(d, day, feature_names, num_embeddings, num_dense) for day in chosen]
    from compress.data.dataset import concat_datasets

    return concat_datasets(parts)


def read_npy_day(
    directory: Path,
    day: int,
    feature_names: Sequence[str],
    num_embeddings: Sequence[int],
    num_dense: int | None = None,
) -> Dataset:
    """One day's three files as a :class:`Dataset` (see :func:`read_npy_days`)."""
    arrays = open_npy_day(directory, day, len(feature_names), num_dense)
    return npy_day_rows(arrays, 0, arrays.rows, feature_names, num_embeddings)


@dataclass(frozen=True)
class NpyDay:
    """One day's three arrays, memory-mapped and checked for shape and dtype (not values):
    ``dense`` float ``[N, D]``, ``sparse`` integer ``[N, F]``, ``labels`` integer ``[N]``."""

    paths: dict[str, Path]
    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.dense.shape[0])


def open_npy_day(
    directory: str | Path, day: int, num_features: int, num_dense: int | None = None
) -> NpyDay:
    """Memory-map one day (reading only the headers) and check shapes and dtypes; a
    :class:`DataError` names the file (see :func:`read_npy_days`)."""
    paths = day_paths(directory, day)
    for path in paths.values():
        if not path.is_file():
            raise DataError(f"{path}: missing (each day needs {', '.join(PARTS)} .npy files)")
    dense, sparse, labels = (_load(paths[p]) for p in PARTS)
    n = dense.shape[0] if dense.ndim else 0
    if dense.ndim != 2 or dense.dtype.kind != "f":
        raise DataError(f"{paths['dense']}: expected float [N, num_dense], got {_desc(dense)}")
    if sparse.ndim != 2 or sparse.dtype.kind not in "iu" or sparse.shape[1] != num_features:
        raise DataError(
            f"{paths['sparse']}: expected integer [N, {num_features}], got {_desc(sparse)}"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.dtype.kind not in "iub":
        raise DataError(f"{paths['labels']}: expected integer [N, 1], got {_desc(labels)}")
    for part, arr in (("sparse", sparse), ("labels", labels)):
        if arr.shape[0] != n:
            raise DataError(f"{paths[part]}: {arr.shape[0]} rows but {paths['dense'].name} has {n}")
    if num_dense is not None and dense.shape[1] != num_dense:
        raise DataError(
            f"{paths['dense']}: {dense.shape[1]} dense features, the model takes {num_dense}"
        )
    return NpyDay(paths=paths, dense=dense, sparse=sparse, labels=labels)


def npy_day_rows(
    day: NpyDay,
    start: int,
    stop: int,
    feature_names: Sequence[str],
    num_embeddings: Sequence[int],
) -> Dataset:
    """Samples ``start`` to ``stop - 1`` of an opened day as a :class:`Dataset`, their values
    checked (a :class:`DataError` names the file and the sample's index in the file)."""
    rows, dense32 = npy_rows_arrays(day, start, stop, num_embeddings, feature_names)
    offsets = np.arange(stop - start + 1, dtype=np.int64)
    from compress.data.dataset import Dataset

    return Dataset(
        dense=dense32,
        labels=np.asarray(day.labels[start:stop], dtype=np.float32),
        values={f: np.ascontiguousarray(rows[:, j]) for j, f in enumerate(feature_names)},
        offsets={f: offsets for f in feature_names},
        dense_transform="log3",  # TorchRec's log(x - min + 2), min = -1 on Criteo (see criteo.py)
    )


def npy_rows_arrays(
    day: NpyDay,
    start: int,
    stop: int,
    num_embeddings: Sequence[int],
    feature_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """``(table rows int64 [n, F], dense float32 [n, D])`` of samples ``start:stop``, with the
    value checks of :func:`read_npy_days` (positions in the message count from the file's start)."""
    dense, sparse, labels = day.dense[start:stop], day.sparse[start:stop], day.labels[start:stop]
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported below
        dense32 = np.array(dense, dtype=np.float32)
    problems = (
        ("dense", describe_first(dense, ~np.isfinite(dense32), "is not a finite float32", start)),
        ("sparse", _find_negative_id(sparse, feature_names, start)),
        ("labels", find_nonbinary(labels, start)),
    )
    for part, problem in problems:
        if problem is not None:
            raise DataError(f"{day.paths[part]}: {problem}")
    return table_rows(sparse, num_embeddings), dense32


def _find_negative_id(ids: np.ndarray, feature_names: Sequence[str], start: int = 0) -> str | None:
    """Where signed ``ids`` [N, num_sparse] first hold a negative id, in words, or None. Ids are
    hashes (``int(hex, 16)``), never negative: a negative one would wrap silently in the modulo."""
    if ids.dtype.kind != "i" or not ids.size:
        return None
    columns = np.flatnonzero(ids.min(axis=0) < 0)
    if not columns.size:
        return None
    j = int(columns[0])
    i = int(np.argmax(ids[:, j] < 0))
    return (
        f"negative id {int(ids[i, j])} at sample {start + i}, column {j} "
        f"(feature {feature_names[j]!r}); "
        "ids must be non-negative"
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
