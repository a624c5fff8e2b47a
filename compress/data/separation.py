"""Validation rows kept apart from training rows: ``--valid`` may not be ``--data``.

Metrics measured on rows the model was fine-tuned on say nothing about new rows, so the main job
refuses validation data that is the training data:

- :func:`check_separate_paths`, before anything is read: ``--valid`` and ``--data`` are the same
  file or directory (also through a symbolic or hard link), or one reads a file the other reads
  (``--valid day_3.tsv`` with ``--data`` the directory holding it; two npy-day directories linking
  the same day file). The files compared are the ones the readers open
  (:func:`data_files`).
- :func:`check_separate_content`, after both are read: the same rows (equal
  :func:`dataset_fingerprint`), e.g. a copy of the training file under another name. Only sets of
  equal length are hashed, so separate sets cost nothing.

A copy of a part of the training data inside other validation data is not detected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from compress.data.criteo_npy import day_paths, find_days
from compress.data.criteo_text import criteo_files
from compress.data.dataset import Dataset
from compress.data.formats import detect_format
from compress.data.parquet_source import parquet_files
from compress.errors import DataError

if TYPE_CHECKING:
    from compress.data.stream import StreamedData
from compress.io.fingerprint import sha256_arrays, sha256_json

_ADVICE = (
    "reported metrics would be measured on training rows; give separate validation data, or leave "
    "out --valid to hold out the last 20% of --data"
)


def data_files(path: str | Path) -> list[Path]:
    """The files a reader opens for ``path``: the file itself, a directory's npy-day files, Parquet
    files or Criteo text files (:func:`compress.data.formats.detect_format`)."""
    p = Path(path)
    if not p.is_dir():
        return [p]
    fmt = detect_format(p)
    if fmt == "npy_days":
        return [f for day in find_days(p) for f in day_paths(p, day).values() if f.exists()]
    if fmt == "parquet":
        return parquet_files(p)
    return criteo_files(p)


def check_separate_paths(data: str | Path, valid: str | Path) -> None:
    """:class:`DataError` when ``valid`` is ``data`` or shares a file with it (see the module
    docstring). Paths that do not exist are left to the readers."""
    data, valid = Path(data), Path(valid)
    if not (data.exists() and valid.exists()):
        return
    if os.path.samefile(data, valid):
        kind = "directory" if data.is_dir() else "file"
        raise DataError(f"--valid {valid}: the same {kind} as --data {data}; {_ADVICE}")
    read_by_data = {_identity(f): f for f in data_files(data)}
    for f in data_files(valid):
        shared = read_by_data.get(_identity(f))
        if shared is not None:
            what = "" if f == valid else f" reads {f}, which is"
            also = f"--data {data}" if shared == data else f"--data {data} ({shared})"
            raise DataError(f"--valid {valid}:{what} also read by {also}; {_ADVICE}")


def check_separate_content(
    train: Dataset | StreamedData, valid: Dataset | StreamedData, data_name: str, valid_name: str
) -> None:
    """:class:`DataError` when ``valid`` holds exactly the rows of ``train`` (same features,
    values and dense transform); sets of different length are not hashed. Two streamed sets
    compare the bytes of their files (hashed when they were indexed); a streamed set and an
    in-memory one are not compared."""
    if len(train) != len(valid) or train.feature_names != valid.feature_names:
        return
    if isinstance(train, Dataset) != isinstance(valid, Dataset):
        return
    if content_fingerprint(train) == content_fingerprint(valid):
        raise DataError(
            f"--valid {valid_name}: the same rows as --data {data_name} (identical content); "
            f"{_ADVICE}"
        )


def content_fingerprint(data: Dataset | StreamedData) -> str:
    """:func:`dataset_fingerprint` of an in-memory set; a streamed set's
    :meth:`~compress.data.stream.StreamedData.fingerprint` (its files' bytes, how they are read
    and the row range)."""
    return dataset_fingerprint(data) if isinstance(data, Dataset) else data.fingerprint()


def dataset_fingerprint(ds: Dataset) -> str:
    """Hex sha256 of the rows of ``ds`` as read: dense, labels, every feature's values and offsets
    (in feature order) and the dense transform they were made with."""
    arrays = [("dense", ds.dense), ("labels", ds.labels)]
    for f in ds.feature_names:
        arrays += [(f"values/{f}", ds.values[f]), (f"offsets/{f}", ds.offsets[f])]
    return sha256_json(
        {"dense_transform": ds.dense_transform, "arrays": sha256_arrays(arrays, desc="data")}
    )


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino
