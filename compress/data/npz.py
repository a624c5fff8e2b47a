"""The project's ``.npz`` dataset file: what the synthetic generator and the demo write.

:func:`save_npz` writes a :class:`~compress.data.dataset.Dataset` as an uncompressed ``np.savez``
archive of plain arrays; :func:`load_npz` reads it back with ``allow_pickle=False`` and refuses
any deviation with a :class:`~compress.errors.DataError` naming the key.

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

    save_npz(ds, "train.npz")
    assert load_npz("train.npz").equals(ds)
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from compress.data.dataset import Dataset
from compress.data.dense_transform import check_transform
from compress.data.value_checks import describe_first, find_nonbinary, find_nonfinite
from compress.errors import DataError

FORMAT_NAME = "dqrm-compress-dataset"
FORMAT_VERSION = 1


def save_npz(dataset: Dataset, path: str | Path) -> None:
    """Write ``dataset`` in the project ``.npz`` format (module docstring) to exactly ``path``."""
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "feature_names": list(dataset.feature_names),
    }
    if dataset.dense_transform is not None:
        meta["dense_transform"] = dataset.dense_transform
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps(meta)),
        "dense": dataset.dense,
        "labels": dataset.labels,
    }
    if dataset.click_prob is not None:
        arrays["click_prob"] = dataset.click_prob
    for f in dataset.feature_names:
        arrays[f"values/{f}"] = dataset.values[f]
        arrays[f"offsets/{f}"] = dataset.offsets[f]
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_npz(path: str | Path) -> Dataset:
    """The dataset in a file written by :func:`save_npz`; any deviation is a :class:`DataError`
    naming the key: a missing or extra key, a wrong dtype or shape, a NaN/inf dense value, a label
    other than 0/1, a negative row id (object arrays are never unpickled)."""
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
        return Dataset(
            dense=arrays["dense"],
            labels=arrays["labels"],
            values={f: arrays[f"values/{f}"] for f in feature_names},
            offsets={f: arrays[f"offsets/{f}"] for f in feature_names},
            click_prob=arrays.get("click_prob"),
            dense_transform=transform,
        )
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None


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


def _check_dtype(key: str, arr: np.ndarray, path: str | Path) -> None:
    want = np.dtype(_DTYPES.get(key, np.int64))
    if arr.dtype != want:
        raise DataError(f"{path}: key {key!r} has dtype {arr.dtype}, expected {want}")
