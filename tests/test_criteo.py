"""Criteo raw text reader on the 200 real sample rows and on hand-made malformed lines."""

from __future__ import annotations

import gzip
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import criteo_sample_path, data_spec

from compress.data import criteo_text as criteo
from compress.data.criteo_text import read_criteo
from compress.data.dataset import concat_datasets
from compress.data.formats import detect_format, load_dataset, open_dataset
from compress.errors import DataError
from compress.io.model_spec import DLRMSpec

FEATURES = tuple(f"cat_{i}" for i in range(26))
ROWS = 1000
LOG3 = math.log(3)


@pytest.fixture
def sample(tmp_path) -> Path:
    dst = tmp_path / "criteo_sample.tsv"
    shutil.copy(criteo_sample_path(), dst)
    return dst


def read(path, **kw):
    kw.setdefault("num_embeddings", [ROWS] * 26)
    return read_criteo(path, num_dense=13, num_sparse=26, feature_names=FEATURES, **kw)


def sample_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_sample_rows_parse(sample):
    ds = read(sample).dataset
    assert len(ds) == 200
    assert ds.feature_names == FEATURES and ds.num_dense == 13
    assert int((ds.labels == 1).sum()) == 49 and int((ds.labels == 0).sum()) == 151
    assert ds.dense.dtype == np.float32 and ds.labels.dtype == np.float32
    assert all(ds.values[f].dtype == np.int64 and (ds.lengths(f) == 1).all() for f in FEATURES)
    assert all(ds.values[f].max() < ROWS for f in FEATURES)


def test_sample_hand_checked_values(sample):
    ds = read(sample).dataset
    # line 1: 0, '', 3, 260, '', 17668, ... | 05db9164 08d6d899 ... cat_18 and cat_19 empty
    assert ds.values["cat_0"][0] == int("05db9164", 16) % ROWS == 0x05DB9164 % 1000
    assert ds.values["cat_1"][0] == int("08d6d899", 16) % ROWS
    assert ds.values["cat_20"][0] == int("0429f84b", 16) % ROWS
    assert ds.values["cat_18"][0] == 0 and ds.values["cat_19"][0] == 0  # missing -> 0
    np.testing.assert_allclose(ds.dense[0, :3], [LOG3, math.log(6), math.log(263)], rtol=1e-6)
    # line 2 has I2 = -1 -> log(2)
    np.testing.assert_allclose(ds.dense[1, 1], math.log(2), rtol=1e-6)


def test_sample_matches_a_python_reference(sample):
    ds = read(sample, num_embeddings=list(range(1000, 1026))).dataset
    for i, line in enumerate(sample_lines(sample)):
        fields = line.split("\t")
        assert ds.labels[i] == int(fields[0])
        raw = np.array([int(x or "0") for x in fields[1:14]], dtype=np.float64)
        np.testing.assert_allclose(ds.dense[i], np.log(np.maximum(raw, -2) + 3), rtol=1e-6)
        for j, f in enumerate(FEATURES):
            assert ds.values[f][i] == int(fields[14 + j] or "0", 16) % (1000 + j)


def test_dense_transform_none_keeps_raw_integers(sample):
    ds = read(sample, dense_transform="none").dataset
    assert ds.dense[0, :3].tolist() == [0.0, 3.0, 260.0]
    assert ds.dense[1, 1] == -1.0


def test_gzip_and_directory_give_identical_datasets(sample, tmp_path):
    ref = read(sample).dataset
    gz = tmp_path / "sample.tsv.gz"
    gz.write_bytes(gzip.compress(sample.read_bytes()))
    assert read(gz).dataset.equals(ref)
    lines = sample.read_text().splitlines(keepends=True)
    days = tmp_path / "days"
    days.mkdir()
    (days / "day_2.gz").write_bytes(gzip.compress("".join(lines[:120]).encode()))  # natural order:
    (days / "day_10.tsv").write_text("".join(lines[120:]))  # day_2 before day_10
    got = read(days)
    assert [f.name for f in got.files] == ["day_2.gz", "day_10.tsv"]
    assert got.dataset.equals(ref)


def test_crlf_and_missing_final_newline_parse_the_same(sample, tmp_path):
    ref = read(sample).dataset
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(sample.read_bytes().replace(b"\n", b"\r\n"))
    assert read(crlf).dataset.equals(ref)
    bare = tmp_path / "bare.tsv"
    bare.write_bytes(sample.read_bytes().rstrip(b"\n"))
    assert read(bare).dataset.equals(ref)


def test_small_blocks_give_the_same_result_and_line_numbers(sample, tmp_path, monkeypatch):
    ref = read(sample).dataset
    monkeypatch.setattr(criteo, "CHUNK_BYTES", 1000)
    assert read(sample).dataset.equals(ref)
    lines = sample_lines(sample)
    lines[150] = lines[150][0] + "x" + lines[150][1:]  # label '0x'
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:151: label must be 0 or 1"):
        read(bad)


def _corrupt(line: str, column: int, value: str) -> str:
    fields = line.split("\t")
    fields[column] = value
    return "\t".join(fields)


BAD_LINES = [
    (lambda ln: ln.rsplit("\t", 1)[0], "expected 40 tab-separated fields .* found 39"),
    (lambda ln: ln + "\t", "found 41"),
    (lambda ln: "", "found 1"),
    (lambda ln: _corrupt(ln, 0, "2"), "label must be 0 or 1, got '2'"),
    (lambda ln: _corrupt(ln, 0, ""), "label must be 0 or 1, got ''"),
    (lambda ln: _corrupt(ln, 3, "1.5"), r"integer field 3 \(column 4\) is not an integer: '1.5'"),
    (lambda ln: _corrupt(ln, 5, "-"), "integer field 5"),
    (lambda ln: _corrupt(ln, 2, "1-2"), "integer field 2"),
    (lambda ln: _corrupt(ln, 1, "1" * 19), "integer field 1"),
    (
        lambda ln: _corrupt(ln, 14, "05db916g"),
        r"categorical field 1 \(column 15\) is not hexadecimal",
    ),
    (lambda ln: _corrupt(ln, 39, "0x1f"), "categorical field 26"),
    (lambda ln: _corrupt(ln, 20, "f" * 17), "categorical field 7"),
    (lambda ln: _corrupt(ln, 20, "ab cd"), "categorical field 7"),
]


@pytest.mark.parametrize(("corrupt", "message"), BAD_LINES)
def test_malformed_line_names_file_and_line(sample, tmp_path, corrupt, message):
    lines = sample_lines(sample)
    lines[6] = corrupt(lines[6])
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}:7: .*{message}"):
        read(bad)
    got = read(bad, on_bad_line="skip")
    assert got.skipped_lines == 1 and len(got.dataset) == 199
    assert got.dataset.equals(read(sample).dataset.take([i for i in range(200) if i != 6]))


def test_first_bad_line_is_reported_and_all_are_counted(sample, tmp_path):
    lines = sample_lines(sample)
    lines[40] = _corrupt(lines[40], 20, "zz")
    lines[9] = lines[9] + "\textra"
    lines[120] = _corrupt(lines[120], 2, "abc")
    bad = tmp_path / "bad.tsv.gz"
    bad.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:10: expected 40"):
        read(bad)
    got = read(bad, on_bad_line="skip")
    assert got.skipped_lines == 3 and len(got.dataset) == 197


def test_other_column_counts_and_edge_values(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("1\t-5\t\tffffffffffffffff\t\tA\n0\t7\t12\t0\t00ff\tb\n")
    got = read_criteo(
        path, num_dense=2, num_sparse=3, feature_names=("x", "y", "z"), num_embeddings=[1009, 7, 11]
    )
    ds = got.dataset
    assert ds.labels.tolist() == [1.0, 0.0]
    np.testing.assert_allclose(ds.dense, np.log([[1, 3], [10, 15]]), rtol=1e-6)  # -5 clipped to -2
    assert ds.values["x"].tolist() == [(2**64 - 1) % 1009, 0]
    assert ds.values["y"].tolist() == [0, 255 % 7]
    assert ds.values["z"].tolist() == [10, 11 % 11]
    with pytest.raises(DataError, match="3 categorical columns but 2 feature names"):
        read_criteo(
            path, num_dense=2, num_sparse=3, feature_names=("x", "y"), num_embeddings=[3, 3]
        )


def test_empty_and_all_bad_inputs(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(DataError, match="no samples"):
        read(empty)
    junk = tmp_path / "junk.tsv"
    junk.write_text("a\tb\n")
    with pytest.raises(DataError, match=r"no samples \(1 malformed lines skipped\)"):
        read(junk, on_bad_line="skip")
    corrupt_gz = tmp_path / "x.gz"
    corrupt_gz.write_bytes(b"\x1f\x8b" + b"\x00" * 30)
    with pytest.raises(DataError, match="cannot be read"):
        read(corrupt_gz)


def test_a_50k_line_file_reads_as_its_repeated_rows(sample, tmp_path):
    # the reader parses a large file in blocks; the block boundaries show in no sample
    big = tmp_path / "big.tsv"
    big.write_bytes(sample.read_bytes() * 250)
    assert big.stat().st_size > criteo.CHUNK_BYTES  # more than one block
    once = read(sample).dataset
    assert read(big).dataset.equals(concat_datasets([once] * 250))


def criteo_spec() -> DLRMSpec:
    return data_spec({f: ROWS + i for i, f in enumerate(FEATURES)}, 13)


def test_open_dataset_reads_criteo_text_for_a_spec(sample, tmp_path):
    assert detect_format(sample) == "criteo"
    ds = open_dataset(sample, criteo_spec())
    assert len(ds) == 200 and ds.values["cat_3"][0] == int("f56b7dd5", 16) % (ROWS + 3)
    lines = sample_lines(sample)
    lines[0] = _corrupt(lines[0], 1, "x")
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:1: integer field 1"):
        open_dataset(bad, criteo_spec())
    loaded = load_dataset(bad, criteo_spec(), on_bad_line="skip")
    assert loaded.format == "criteo" and loaded.skipped_lines == 1 and len(loaded.dataset) == 199
