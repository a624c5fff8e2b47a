"""Parquet data (compress.data.parquet_source): the same rows and batches as the formats the tool
already reads, one-hot and multi-hot, whole and streamed; memory that does not grow with the file;
errors naming the file, the row and the column; the command line's --columns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import data_spec, tiny_world

from compress import pipeline
from compress.cli.main import main
from compress.data.dataset import Dataset
from compress.data.formats import detect_format, open_dataset
from compress.data.jagged_rows import JaggedShuffleBuffer, concat_jagged, one_hot_rows
from compress.data.npz import load_npz
from compress.data.row_batches import ShuffleBuffer
from compress.data.stream import LoaderSettings, open_data, open_stream
from compress.data.stream_source import RowBlock
from compress.errors import DataError

ROWS = {"a": 50, "b": 1000, "c": 7}
SPEC = data_spec(ROWS, 3)
NAMES = SPEC.feature_names
SMALL = {"block_bytes": 1500, "shuffle_rows": 400}


def write_parquet(
    ds: Dataset,
    path: Path,
    *,
    columns: dict[str, str] | None = None,
    row_group_size: int = 700,
    as_lists: tuple[str, ...] = (),
    dense_names: tuple[str, ...] | None = None,
    label_type: pa.DataType | None = None,
) -> None:
    """``ds`` as one Parquet file: ``label``, dense columns ``d0..`` (or ``dense_names``), one
    column per feature (named by ``columns``, default its own name) holding its id, or a list of
    ids for the features in ``as_lists`` and those whose bags are not all one id."""
    table = {"label": pa.array(ds.labels.astype(np.int64), type=label_type or pa.int8())}
    dense_names = dense_names or tuple(f"d{j}" for j in range(ds.num_dense))
    for j, name in enumerate(dense_names):
        table[name] = ds.dense[:, j]
    for f in ds.feature_names:
        offsets, values = ds.offsets[f], ds.values[f]
        name = (columns or {}).get(f, f)
        if f in as_lists or not (np.diff(offsets) == 1).all():
            table[name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
        else:
            table[name] = values
    pq.write_table(pa.table(table), path, row_group_size=row_group_size)


def numbered(n: int, seed: int = 0, max_bag: int = 0) -> Dataset:
    """``n`` rows whose dense column 0 is the row's number; ``b`` holds bags of 0..max_bag ids
    (one id each when ``max_bag`` is 0)."""
    rng = np.random.default_rng(seed)
    dense = np.column_stack([np.arange(n), rng.random((n, 2))]).astype(np.float32)
    values, offsets = {}, {}
    for f, rows in ROWS.items():
        lengths = (
            rng.integers(0, max_bag + 1, n) if (f == "b" and max_bag) else np.ones(n, np.int64)
        )
        offsets[f] = np.concatenate([[0], np.cumsum(lengths)])
        values[f] = rng.integers(0, rows, int(lengths.sum()))
    return Dataset(
        dense=dense,
        labels=rng.integers(0, 2, n).astype(np.float32),
        values=values,
        offsets=offsets,
        dense_transform="none",
    )


def stored(**extra) -> dict:
    """A column mapping for files written by :func:`write_parquet` (values as stored)."""
    return {"dense_transform": "none", **extra}


def batches_equal(a, b) -> bool:
    return (
        torch.equal(a.dense, b.dense)
        and torch.equal(a.labels, b.labels)
        and a.sparse.keys() == b.sparse.keys()
        and torch.equal(a.sparse.values(), b.sparse.values())
        and torch.equal(a.sparse.lengths(), b.sparse.lengths())
    )


# ------------------------------------------------------ the same rows as the existing formats


def test_one_hot_parquet_gives_the_batches_of_the_same_npy_days(tmp_path):
    """TorchRec npy days and a Parquet copy of their rows (hashed ids, log3-stored dense): the
    same rows read whole, the same batches in file order, and the same training batches
    streamed (a shuffle buffer holding every row draws the same order whatever the blocks)."""
    days = tmp_path / "days"
    days.mkdir()
    rng = np.random.default_rng(3)
    parts = []
    for day, n in enumerate([1300, 700, 1]):
        dense = rng.random((n, 3)).astype(np.float32)
        sparse = rng.integers(0, 2**40, (n, 3))
        labels = rng.integers(0, 2, (n, 1)).astype(np.int32)
        np.save(days / f"day_{day}_dense.npy", dense)
        np.save(days / f"day_{day}_sparse.npy", sparse)
        np.save(days / f"day_{day}_labels.npy", labels)
        parts.append((dense, sparse, labels))
    pdir = tmp_path / "pq"
    pdir.mkdir()
    (pdir / "_SUCCESS").write_text("")  # Spark's marker is ignored, as are hidden files
    for i, (dense, sparse, labels) in enumerate(parts):
        table = {"click": labels[:, 0], **{f"int_{j}": dense[:, j] for j in range(3)}}
        table.update({f"cat_{j}": sparse[:, j] for j in range(3)})
        pq.write_table(pa.table(table), pdir / f"part-{i}.parquet", row_group_size=400)
    mapping = {
        "label": "click",
        "dense": ["int_0", "int_1", "int_2"],
        "sparse": {f: f"cat_{j}" for j, f in enumerate(NAMES)},
        "dense_transform": "log3",
        "ids": "hash",
    }
    assert detect_format(pdir) == "parquet"
    whole_days = open_dataset(days, SPEC)
    whole_pq = open_dataset(pdir, SPEC, columns=mapping)
    assert whole_pq.equals(whole_days) and whole_pq.dense_transform == "log3"

    settings = LoaderSettings(stream="on", workers=2, block_bytes=3000, shuffle_rows=10_000)
    s_days = open_stream(days, SPEC, settings=settings)
    s_pq = open_stream(pdir, SPEC, settings=settings, columns=mapping)
    assert len(s_pq) == len(s_days) == 2001 and len(s_pq.source.blocks) > 6
    for x, y in zip(
        s_pq.batches(256, feature_names=NAMES),
        s_days.batches(256, feature_names=NAMES),
        strict=True,
    ):
        assert batches_equal(x, y)
    with s_pq.train_batches(NAMES, 256, seed=7) as a, s_days.train_batches(NAMES, 256, 7) as b:
        for _ in range(12):  # more than one pass (7 batches a pass)
            assert batches_equal(next(a), next(b))
    assert s_pq.one_hot_features == NAMES
    # held-out tail and validation slices are the same row ranges
    assert [len(p) for p in s_pq.split_tail(0.2)] == [len(p) for p in s_days.split_tail(0.2)]


def test_multi_hot_parquet_equals_the_npz_rows(tmp_path):
    """List columns (bags of 0-4 ids, empty ones included) read whole equal the .npz dataset; the
    stream's batches in file order equal the dataset's, and each shuffled pass yields every row
    once."""
    ds = numbered(2500, max_bag=4)
    write_parquet(ds, tmp_path / "d.parquet")
    from compress.data.npz import save_npz

    save_npz(ds, tmp_path / "d.npz")
    whole = open_dataset(tmp_path / "d.parquet", SPEC, columns=stored())
    assert whole.equals(open_dataset(tmp_path / "d.npz", SPEC))

    data = open_stream(
        tmp_path / "d.parquet",
        SPEC,
        settings=LoaderSettings(stream="on", workers=2, **SMALL),
        columns=stored(),
    )
    assert data.source.jagged and data.one_hot_features == ("a", "c")
    for x, y in zip(
        data.batches(300, feature_names=NAMES), ds.batches(300, feature_names=NAMES), strict=True
    ):
        assert batches_equal(x, y)
    passes: dict[int, list] = {}
    for p, rows in data.pass_chunks(seed=1, passes=2):
        if rows is not None:
            passes.setdefault(p, []).append(rows)
    first, second = (concat_jagged(passes[p]) for p in (0, 1))
    for rows in (first, second):
        np.testing.assert_array_equal(np.sort(rows.dense[:, 0]), np.arange(2500))
    assert not np.array_equal(first.dense[:, 0], np.arange(2500))
    assert not np.array_equal(first.dense[:, 0], second.dense[:, 0])
    # each row keeps its own bags through the shuffle
    index = first.dense[:, 0].astype(np.int64)
    expected = ds.take(index)
    np.testing.assert_array_equal(first.feature_ids(1), expected.values["b"])
    np.testing.assert_array_equal(first.feature_offsets(1), expected.offsets["b"])


def test_jagged_shuffle_buffer_draws_what_the_one_hot_buffer_draws():
    """The reference-holding buffer of multi-hot rows hands on exactly the rows, in exactly the
    order, of the one-hot record buffer for the same seed, across compactions and passes."""
    rng = np.random.default_rng(0)
    blocks = []
    first = 0
    for m in rng.integers(1, 260, 40):
        labels = np.arange(first, first + m, dtype=np.float32)
        blocks.append(
            RowBlock(labels, rng.random((m, 2)).astype(np.float32), rng.integers(0, 9, (m, 3)))
        )
        first += m
    for capacity in (0, 100, 333, 5000):
        plain = ShuffleBuffer(capacity, np.random.default_rng([4, 0]))
        jagged = JaggedShuffleBuffer(capacity, np.random.default_rng([4, 0]))
        out_plain, out_jagged = [], []
        for block in blocks:
            a = plain.push(block)
            b = jagged.push(one_hot_rows(block.labels, block.dense, block.ids))
            assert (a is None) == (b is None)
            if a is not None:
                out_plain.append(a)
                out_jagged.append(b)
        out_plain.append(plain.drain())
        out_jagged.append(jagged.drain())
        for a, b in zip(out_plain, out_jagged, strict=True):
            if a is None:
                assert b is None
                continue
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.dense, b.dense)
            np.testing.assert_array_equal(a.ids.reshape(-1), b.values)
        assert jagged.max_size == plain.max_size
        if capacity == 100:  # compacted many times, never more than twice the buffer plus a block
            assert jagged._rows <= 2 * capacity + 260


def test_parquet_stream_memory_does_not_grow_with_the_file(tmp_path):
    """One pass over 4x the rows (and 4x the row-group size) takes about the same memory: numpy
    arrays (tracemalloc) and pyarrow's pool both stay near one block."""
    import tracemalloc

    peaks = []
    for n in (30_000, 120_000):
        ds = numbered(n, max_bag=3)
        path = tmp_path / f"d{n}.parquet"
        write_parquet(ds, path, row_group_size=n)  # one row group: the worst case
        data = open_stream(
            path,
            SPEC,
            settings=LoaderSettings(
                stream="on", workers=0, block_bytes=64 << 10, shuffle_rows=2000
            ),
            columns=stored(),
        )
        del ds
        tracemalloc.start()
        arrow_peak = 0
        rows = 0
        for _, block in data.pass_chunks(seed=0):
            if block is not None:
                rows += len(block)
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        numpy_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert rows == n
        peaks.append((numpy_peak, arrow_peak))
    (np_small, pa_small), (np_large, pa_large) = peaks
    assert np_large < 1.5 * np_small + (1 << 20), peaks
    assert pa_large < 1.5 * pa_small + (2 << 20), peaks
    assert np_large < 120_000 * 40 / 4, peaks  # far below the decoded file (~40 bytes a row)


# ---------------------------------------------------------------------- through the main job


def _parquet_world(tmp_path):
    """The tiny world's .npz files and Parquet copies (one-hot and multi-hot features)."""
    ckpt, train, valid, _ = tiny_world(tmp_path)
    cols = {f"cat_{i}": f"c{i}" for i in range(4)}
    for src in (train, valid):
        write_parquet(
            load_npz(src),
            src.with_suffix(".parquet"),
            columns=cols,
            dense_names=tuple(f"i{j}" for j in range(5)),
        )
    mapping = tmp_path / "columns.json"
    mapping.write_text(json.dumps({"sparse": cols, "dense_transform": "none"}))
    return ckpt, train, valid, mapping


@pytest.mark.slow
def test_the_main_job_on_parquet_equals_the_same_rows_as_npz(tmp_path, capsys):
    ckpt, train, valid, mapping = _parquet_world(tmp_path)
    runs = {}
    for kind, (t, v, extra) in {
        "npz": (train, valid, []),
        "parquet": (
            train.with_suffix(".parquet"),
            valid.with_suffix(".parquet"),
            ["--columns", mapping],
        ),
    }.items():
        argv = ["--recipe", "int4_qat", ckpt, "--data", t, "--valid", v, "--steps", "20"]
        code = main([str(a) for a in [*argv, *extra, "--out", tmp_path / kind, "--json"]])
        out = capsys.readouterr().out
        assert code == 0, out
        runs[kind] = json.loads(out)
    assert runs["parquet"]["metrics"] == runs["npz"]["metrics"]
    assert runs["parquet"]["bytes_after"] == runs["npz"]["bytes_after"]
    code = main(
        [
            str(a)
            for a in [
                "eval",
                ckpt,
                "--data",
                valid.with_suffix(".parquet"),
                "--columns",
                mapping,
                "--json",
            ]
        ]
    )
    pq_eval = json.loads(capsys.readouterr().out)
    code2 = main([str(a) for a in ["eval", ckpt, "--data", valid, "--json"]])
    npz_eval = json.loads(capsys.readouterr().out)
    assert code == code2 == 0
    assert {k: pq_eval[k] for k in ("auc", "logloss", "n")} == {
        k: npz_eval[k] for k in ("auc", "logloss", "n")
    }


def test_streamed_multi_hot_parquet_fine_tunes(tmp_path):
    ckpt, train, valid, mapping = _parquet_world(tmp_path)
    job = pipeline.load(ckpt)
    result = pipeline.compress(
        job,
        pipeline.plan(job, "int4_qat"),
        data=train.with_suffix(".parquet"),
        valid=valid.with_suffix(".parquet"),
        columns=mapping,
        steps=6,
        loader=LoaderSettings(stream="on", workers=2, block_bytes=20_000),
    )
    assert result.loader["mode"] == {"train": "stream", "valid": "stream"}
    assert result.loader["rows"] > 0 and result.train.steps == 6
    assert result.one_hot_features == ("cat_0", "cat_2", "cat_3")  # cat_1 holds bags of 2
    assert result.metrics["compressed"]["n"] == result.metrics["baseline"]["n"] > 0
    assert result.dense_transform == "none"


def test_raw_dense_values_get_the_runs_transform(tmp_path):
    """Without the mapping's dense_transform the stored values are raw counts: read with log3
    (the default, as Criteo text) or --dense-transform."""
    ds = numbered(50)
    raw = Dataset(ds.dense * 10, ds.labels, ds.values, ds.offsets)
    write_parquet(raw, tmp_path / "r.parquet")
    got = open_dataset(tmp_path / "r.parquet", SPEC)
    assert got.dense_transform == "log3"
    np.testing.assert_allclose(got.dense, np.log(raw.dense.astype(np.float64) + 3), rtol=1e-6)
    same = open_dataset(tmp_path / "r.parquet", SPEC, dense_transform="none")
    np.testing.assert_array_equal(same.dense, raw.dense)
    with pytest.raises(DataError, match=r"stored 'none'-transformed.*'log3' is asked for"):
        open_dataset(tmp_path / "r.parquet", SPEC, columns=stored(), dense_transform="log3")


# ------------------------------------------------------------------------------------ errors


def _table(n: int = 20, **override) -> dict:
    rng = np.random.default_rng(1)
    table = {
        "label": pa.array(rng.integers(0, 2, n)),
        "d0": pa.array(rng.random(n)),
        "d1": pa.array(rng.random(n)),
        "d2": pa.array(rng.random(n)),
        "a": pa.array(rng.integers(0, 50, n)),
        "b": pa.array([[1, 2]] * n, type=pa.list_(pa.int64())),
        "c": pa.array(rng.integers(0, 7, n)),
    }
    for key, value in override.items():
        if value is None:
            del table[key]
        else:
            table[key] = value
    return table


def _with(values: list, at: int, value, n: int = 20) -> list:
    out = list(values[:n])
    out[at] = value
    return out


BAD_FILES = {
    "missing column": (
        _table(b=None),
        r"column 'b' \(feature 'b'\) is missing \(the file has: label, d0",
    ),
    "string ids": (
        _table(a=pa.array(["x"] * 20)),
        r"column 'a' \(feature 'a'\) has type string, expected integer ids or lists",
    ),
    "float ids": (_table(c=pa.array(np.zeros(20))), r"column 'c' .* has type double"),
    "null label": (
        _table(label=pa.array(_with([0] * 20, 4, None), pa.int64())),
        r"row 4, column 'label' \(the label\): null",
    ),
    "null dense": (
        _table(d1=pa.array(_with([0.5] * 20, 7, None))),
        r"row 7, column 'd1' \(dense feature 1\): null",
    ),
    "null id": (
        _table(a=pa.array(_with([1] * 20, 11, None), pa.int64())),
        r"row 11, column 'a' \(feature 'a'\): null",
    ),
    "null bag": (
        _table(b=pa.array(_with([[1]] * 20, 9, None), pa.list_(pa.int64()))),
        r"row 9, column 'b' \(feature 'b'\): null",
    ),
    "null id in a bag": (
        _table(b=pa.array(_with([[1]] * 20, 6, [3, None]), pa.list_(pa.int64()))),
        r"row 6, column 'b' \(feature 'b'\): a null id in the list",
    ),
    "negative id": (
        _table(c=pa.array(_with([1] * 20, 13, -3), pa.int64())),
        r"row 13, column 'c' \(feature 'c'\): id -3 is negative",
    ),
    "negative id in a bag": (
        _table(b=pa.array(_with([[1]] * 20, 15, [2, -1]), pa.list_(pa.int64()))),
        r"row 15, column 'b' \(feature 'b'\): id -1 is negative",
    ),
    "id beyond its table": (
        _table(c=pa.array(_with([1] * 20, 2, 7), pa.int64())),
        r"row 2, column 'c' \(feature 'c'\): id 7 is beyond its table's 7 rows",
    ),
    "label 2": (
        _table(label=pa.array(_with([1] * 20, 3, 2), pa.int64())),
        r"row 3, column 'label' \(the label\): value 2 is not a label",
    ),
    "nan dense": (
        _table(d2=pa.array(_with([0.1] * 20, 5, float("nan")))),
        r"row 5, column 'd2' \(dense feature 2\): value nan is not",
    ),
    "too many dense": (
        _table(d3=pa.array(np.zeros(20))),
        r"4 columns are left for dense features \(d0, d1, d2, d3\) but the model takes 3",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_parquet_is_one_line_naming_file_row_and_column(tmp_path, case):
    table, message = BAD_FILES[case]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(table), path, row_group_size=8)
    with pytest.raises(DataError, match=message) as err:
        open_dataset(path, SPEC, columns=stored())
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_a_bad_row_read_by_a_worker_names_it(tmp_path):
    ds = numbered(3000)
    ds.values["a"][2345] = 99  # table a has 50 rows
    write_parquet(ds, tmp_path / "d.parquet", row_group_size=1000)
    data = open_stream(
        tmp_path / "d.parquet",
        SPEC,
        settings=LoaderSettings(stream="on", workers=2, **SMALL),
        columns=stored(),
    )
    with pytest.raises(DataError, match=r"d\.parquet: row 2345, column 'a' \(feature 'a'\): id 99"):
        list(data.batches(500, feature_names=NAMES))


def test_mapping_and_directory_mistakes(tmp_path):
    write_parquet(numbered(30), tmp_path / "d.parquet")
    bad = tmp_path / "cols.json"
    bad.write_text(json.dumps({"label": "label", "dense_columns": ["d0"]}))
    with pytest.raises(DataError, match=r"cols\.json: unknown key 'dense_columns'"):
        open_dataset(tmp_path / "d.parquet", SPEC, columns=bad)
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"cols\.json: the column mapping must be a JSON object"):
        open_dataset(tmp_path / "d.parquet", SPEC, columns=bad)
    with pytest.raises(DataError, match=r"sparse names feature 'zz', which the model does not"):
        open_dataset(tmp_path / "d.parquet", SPEC, columns={"sparse": {"zz": "a"}})
    with pytest.raises(DataError, match=r"ids must be one of rows, hash"):
        open_dataset(tmp_path / "d.parquet", SPEC, columns={"ids": "modulo"})
    with pytest.raises(DataError, match=r"applies to Parquet data only"):
        open_data(_npz(tmp_path), SPEC, columns=stored())
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_parquet(numbered(30), mixed / "part-0.parquet")
    (mixed / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: not a Parquet file, in a directory of"):
        open_dataset(mixed, SPEC, columns=stored())
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot be read as Parquet"):
        open_dataset(junk, SPEC)


def _npz(tmp_path: Path) -> Path:
    from compress.data.npz import save_npz

    save_npz(numbered(10), tmp_path / "d.npz")
    return tmp_path / "d.npz"


def test_without_pyarrow_parquet_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch):
    write_parquet(numbered(10), tmp_path / "d.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"reading Parquet needs pyarrow.*dqrm-compress\[parquet\]"):
        open_dataset(tmp_path / "d.parquet", SPEC)


def test_cli_parquet_errors_are_one_line_exit_2(tmp_path, capsys):
    ckpt, train, valid, mapping = _parquet_world(tmp_path)
    mapping.write_text(json.dumps({"sparse": {"cat_0": "nope"}}))
    code = main(
        [
            str(a)
            for a in [
                "--recipe",
                "int8_ptq",
                ckpt,
                "--data",
                train.with_suffix(".parquet"),
                "--columns",
                mapping,
                "--json",
            ]
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert "train.parquet: column 'nope' (feature 'cat_0') is missing" in err
