"""TorchRec npy day files: small days written with numpy in tmp_path."""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import data_spec

from compress.data.criteo_npy import find_days, read_npy_days
from compress.data.formats import detect_format, open_dataset
from compress.errors import DataError
from compress.io.model_spec import DLRMSpec

FEATURES = ("cat_0", "cat_1", "cat_2")
ROWS = (5, 100, 7)


def write_day(
    directory, day: int, n: int, seed: int = 0, num_dense: int = 4
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "dense": np.log(rng.integers(0, 50, (n, num_dense)) + 3).astype(np.float32),
        "sparse": rng.integers(0, 2**40, (n, len(FEATURES)), dtype=np.int64),
        "labels": rng.integers(0, 2, (n, 1)).astype(np.int32),
    }
    for part, arr in arrays.items():
        np.save(directory / f"day_{day}_{part}.npy", arr)
    return arrays


def read(directory, **kw):
    return read_npy_days(directory, feature_names=FEATURES, num_embeddings=ROWS, **kw)


def test_days_are_read_in_numeric_order_with_ids_modulo_rows(tmp_path):
    day10 = write_day(tmp_path, 10, 6, seed=1)
    day2 = write_day(tmp_path, 2, 4, seed=2)
    assert find_days(tmp_path) == [2, 10]
    ds = read(tmp_path)
    assert len(ds) == 10 and ds.num_dense == 4 and ds.feature_names == FEATURES
    np.testing.assert_array_equal(ds.dense, np.concatenate([day2["dense"], day10["dense"]]))
    np.testing.assert_array_equal(
        ds.labels, np.concatenate([day2["labels"], day10["labels"]])[:, 0]
    )
    sparse = np.concatenate([day2["sparse"], day10["sparse"]])
    for j, f in enumerate(FEATURES):
        np.testing.assert_array_equal(ds.values[f], sparse[:, j] % ROWS[j])
        assert (ds.lengths(f) == 1).all()
    assert ds.labels.dtype == np.float32 and ds.values["cat_1"].dtype == np.int64
    assert len(read(tmp_path, days=[10])) == 6


def test_unsigned_ids_take_the_modulo_without_wrapping(tmp_path):
    write_day(tmp_path, 0, 3)
    big = np.array([[2**64 - 1, 2**63, 12]] * 3, dtype=np.uint64)
    np.save(tmp_path / "day_0_sparse.npy", big)
    ds = read(tmp_path)
    assert ds.values["cat_0"][0] == (2**64 - 1) % 5
    assert ds.values["cat_1"][0] == 2**63 % 100


@pytest.mark.parametrize("part", ["dense", "sparse", "labels"])
def test_missing_file_is_named(tmp_path, part):
    write_day(tmp_path, 0, 3)
    (tmp_path / f"day_0_{part}.npy").unlink()
    if part == "dense":
        with pytest.raises(DataError, match="no day_<i>_dense.npy"):
            read(tmp_path)
        return
    with pytest.raises(DataError, match=re.escape(f"day_0_{part}.npy: missing")):
        read(tmp_path)


@pytest.mark.parametrize(
    ("part", "array", "message"),
    [
        (
            "labels",
            np.zeros((4, 1), np.int32),
            r"day_0_labels.npy: 4 rows but day_0_dense.npy has 3",
        ),
        ("sparse", np.zeros((3, 2), np.int64), r"day_0_sparse.npy: expected integer \[N, 3\]"),
        ("sparse", np.zeros((3, 3), np.float32), r"day_0_sparse.npy: expected integer"),
        ("dense", np.zeros(3, np.float32), r"day_0_dense.npy: expected float \[N, num_dense\]"),
        (
            "labels",
            np.full((3, 1), -1, np.int32),
            r"labels.npy: value -1 at sample 0 is not a label",
        ),
        ("labels", np.array([None] * 3, dtype=object), r"day_0_labels.npy: cannot be read"),
    ],
)
def test_bad_shapes_name_the_file(tmp_path, part, array, message):
    write_day(tmp_path, 0, 3)
    np.save(tmp_path / f"day_0_{part}.npy", array, allow_pickle=True)
    with pytest.raises(DataError, match=message):
        read(tmp_path)


def spec(num_dense: int = 4) -> DLRMSpec:
    return data_spec(dict(zip(FEATURES, ROWS, strict=True)), num_dense)


def test_open_dataset_detects_npy_days(tmp_path):
    write_day(tmp_path, 0, 3)
    assert detect_format(tmp_path) == "npy_days"
    ds = open_dataset(tmp_path, spec())
    assert len(ds) == 3 and ds.feature_names == FEATURES
    with pytest.raises(DataError, match="4 dense features, the model takes 13"):
        open_dataset(tmp_path, spec(num_dense=13))
