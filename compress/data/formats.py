"""Open labelled data for a model from a path, whatever its format.

:func:`open_dataset` decides the format from the path and returns a
:class:`~compress.data.dataset.Dataset` whose sparse features are exactly the model's
``spec.feature_names`` (in that order), whose dense width is ``spec.dense_in_features`` and whose
row ids fit each feature's table:

- a file ending in ``.npz`` or starting with the zip signature: the project format
  (:func:`compress.data.npz.load_npz`),
- a directory holding ``day_<i>_dense.npy`` files: TorchRec's preprocessed days
  (:mod:`compress.data.criteo_npy`),
- a file ending in ``.parquet``/``.pq`` or starting with ``PAR1``, or a directory holding such
  files: Parquet (:mod:`compress.data.parquet_source`, pyarrow), its columns named by a
  :class:`~compress.data.parquet_columns.ColumnMapping` (``columns``),
- any other file (``.tsv``, ``.txt``, ``.gz``, no suffix) or directory of files: Criteo raw text
  (:mod:`compress.data.criteo_text`), with ``spec.dense_in_features`` integer and one hex column per feature.

``on_bad_line`` applies to raw text only. ``dense_transform`` (:mod:`compress.data.dense_transform`) is
what raw text is read with (``None``: ``log3``); the other two formats store already-transformed
dense values, returned as stored with the transform they record (``log3`` for TorchRec's npy days, an
``.npz`` its own), and a ``dense_transform`` that differs from it is a :class:`DataError` (an
``.npz`` that records none takes the one given). Parquet is read like raw text unless its column
mapping records the stored values' transform, then like an ``.npz``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from compress.data.criteo_npy import find_days, read_npy_days
from compress.data.criteo_text import OnBadLine, read_criteo
from compress.data.dataset import Dataset
from compress.data.dense_transform import DEFAULT_TEXT_TRANSFORM, DenseTransform, check_transform
from compress.data.npz import load_npz
from compress.data.parquet_columns import ColumnMapping, mapping_from
from compress.data.parquet_source import is_parquet_dir, is_parquet_file
from compress.errors import DataError
from compress.io.model_spec import DLRMSpec

log = logging.getLogger(__name__)

DataFormat = Literal["npz", "npy_days", "parquet", "criteo"]
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class LoadedData:
    """A dataset with where it came from: its format and the malformed lines skipped (raw text)."""

    dataset: Dataset
    format: DataFormat
    skipped_lines: int = 0


def open_dataset(
    path: str | Path,
    spec: DLRMSpec,
    *,
    on_bad_line: OnBadLine = "error",
    dense_transform: DenseTransform | None = None,
    check_row_ids: bool = True,
    columns: ColumnMapping | dict | str | Path | None = None,
) -> Dataset:
    """The samples at ``path`` for a model of shape ``spec`` (see the module docstring).

    Raises :class:`DataError` for a missing path, an empty directory, a malformed file, or data that
    does not fit ``spec``. Skipped lines (``on_bad_line="skip"``) are logged as a warning; use
    :func:`load_dataset` to get their count. ``check_row_ids=False`` leaves ids beyond a table
    in ``.npz`` data to the caller (a server that decides what to do with them).
    """
    return load_dataset(
        path,
        spec,
        on_bad_line=on_bad_line,
        dense_transform=dense_transform,
        check_row_ids=check_row_ids,
        columns=columns,
    ).dataset


def load_dataset(
    path: str | Path,
    spec: DLRMSpec,
    *,
    on_bad_line: OnBadLine = "error",
    dense_transform: DenseTransform | None = None,
    check_row_ids: bool = True,
    columns: ColumnMapping | dict | str | Path | None = None,
) -> LoadedData:
    """Like :func:`open_dataset`, also returning the detected format and skipped-line count."""
    p = Path(path)
    if dense_transform is not None:
        check_transform(dense_transform, "dense_transform")
    fmt = detect_format(p)
    features = spec.feature_names
    rows = [spec.table_of_feature(f).num_embeddings for f in features]
    skipped = 0
    if columns is not None and fmt != "parquet":
        raise DataError(f"{p}: a column mapping (--columns) applies to Parquet data only")
    if fmt == "parquet":
        from compress.data.parquet_source import index_parquet
        from compress.data.source_whole import read_whole

        source = index_parquet(
            p,
            feature_names=features,
            num_embeddings=rows,
            num_dense=spec.dense_in_features,
            columns=mapping_from(columns),
            dense_transform=dense_transform,
        )
        return LoadedData(dataset=read_whole(source), format=fmt)
    if fmt == "npz":
        dataset = load_npz(p)
        check_fits(dataset, spec, p, check_row_ids)
        dataset = dataset.select_features(features)
    elif fmt == "npy_days":
        dataset = read_npy_days(
            p, feature_names=features, num_embeddings=rows, num_dense=spec.dense_in_features
        )
        check_fits(dataset, spec, p)
    else:
        read = read_criteo(
            p,
            num_dense=spec.dense_in_features,
            num_sparse=len(features),
            feature_names=features,
            num_embeddings=rows,
            on_bad_line=on_bad_line,
            dense_transform=dense_transform or DEFAULT_TEXT_TRANSFORM,
        )
        dataset, skipped = read.dataset, read.skipped_lines
        if skipped:
            log.warning("%s: skipped %d malformed lines", p, skipped)
    if fmt != "criteo" and dense_transform is not None:
        dataset = _stored_transform(dataset, dense_transform, p)
    return LoadedData(dataset=dataset, format=fmt, skipped_lines=skipped)


def _stored_transform(dataset: Dataset, wanted: str, source: Path) -> Dataset:
    """``dataset`` (already transformed when stored) if its transform is ``wanted``; one that
    records none is taken to hold ``wanted``; another one is a :class:`DataError`."""
    if dataset.dense_transform is None:
        dataset.dense_transform = wanted  # a dataset just read: no one else holds it
        return dataset
    if dataset.dense_transform != wanted:
        raise DataError(
            f"{source}: dense features are stored {dataset.dense_transform!r}-transformed, but "
            f"{wanted!r} is asked for (the model's inputs, or --dense-transform)"
        )
    return dataset


def detect_format(path: str | Path) -> DataFormat:
    """``"npz"``, ``"npy_days"``, ``"parquet"`` or ``"criteo"`` for ``path`` (see the module
    docstring)."""
    p = Path(path)
    if p.is_dir():
        if find_days(p):
            return "npy_days"
        if is_parquet_dir(p):
            return "parquet"
        if not any(f.is_file() and not f.name.startswith(".") for f in p.iterdir()):
            raise DataError(f"{p}: directory holds no data files")
        return "criteo"
    if p.is_file():
        if p.suffix == ".npz" or _starts_with(p, _ZIP_MAGIC):
            return "npz"
        if is_parquet_file(p):
            return "parquet"
        return "criteo"
    raise DataError(f"{p}: no such file or directory")


def check_fits(
    dataset: Dataset, spec: DLRMSpec, source: str | Path, check_row_ids: bool = True
) -> None:
    """Raise :class:`DataError` unless ``dataset`` has ``spec``'s dense width, every feature of
    ``spec`` and (``check_row_ids``) only row ids below each feature's table size."""
    if dataset.num_dense != spec.dense_in_features:
        raise DataError(
            f"{source}: {dataset.num_dense} dense features, the model takes "
            f"{spec.dense_in_features}"
        )
    for f in spec.feature_names:
        if f not in dataset.values:
            raise DataError(
                f"{source}: no sparse feature {f!r} (the data has {list(dataset.feature_names)})"
            )
        rows = spec.table_of_feature(f).num_embeddings
        values = dataset.values[f]
        if check_row_ids and values.size and int(np.max(values)) >= rows:
            raise DataError(
                f"{source}: feature {f!r} has row id {int(np.max(values))}, its table has "
                f"{rows} rows"
            )


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(magic)) == magic
