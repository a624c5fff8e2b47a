"""Streamed data (compress.data.stream): worker processes, a bounded seeded shuffle buffer, passes
that yield every row once, errors that name file and line, no orphaned workers, and fine-tuning
from a streamed text file through the pipeline."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import data_spec, interruptible, make_dlrm

from compress import pipeline
from compress.data import stream_workers
from compress.data.criteo_write import write_criteo_text, write_synthetic_criteo
from compress.data.dataset import Dataset
from compress.data.formats import open_dataset
from compress.data.npz import save_npz
from compress.data.row_batches import ShuffleBuffer, rows_to_batch
from compress.data.stream import (
    LoaderSettings,
    StreamedData,
    open_data,
    open_stream,
)
from compress.data.stream_source import RowBlock
from compress.data.synthetic import SyntheticConfig
from compress.errors import DataError, DqrmError
from compress.train.config import TrainConfig
from compress.train.loop import fit

ROWS = {"a": 50, "b": 1000, "c": 7}
SPEC = data_spec(ROWS, 3)
NAMES = SPEC.feature_names
#: small blocks, so that a few thousand lines make many blocks (the last one shorter)
SMALL = {"block_bytes": 2000, "shuffle_rows": 500}


def write_numbered(path: Path, n: int, first: int = 0, seed: int = 0, gz: bool = False) -> None:
    """``n`` Criteo lines whose first dense field is the row's number (``first`` onwards)."""
    rng = np.random.default_rng(seed)
    number = np.arange(first, first + n)
    dense = np.column_stack([number, rng.integers(-1, 100, (n, 2))])
    ids = rng.integers(0, 2**40, (n, len(ROWS)))
    write_criteo_text(path, number % 2, dense, ids, compress=gz)


def stream(path, **settings) -> StreamedData:
    options = {"stream": "on", "workers": 2, **SMALL, **settings}
    return open_stream(path, SPEC, settings=LoaderSettings(**options), dense_transform="none")


def pass_numbers(data: StreamedData, seed: int, passes: int = 1) -> list[np.ndarray]:
    """Row numbers (first dense value) of each pass in training order."""
    out: dict[int, list[np.ndarray]] = {}
    for p, rows in data.pass_chunks(seed, passes=passes):
        if rows is not None:
            out.setdefault(p, []).append(rows.dense[:, 0].astype(np.int64))
    return [np.concatenate(out[p]) for p in sorted(out)]


def write_npy_days(directory: Path, sizes: list[int]) -> int:
    """Npy days whose dense column 0 numbers the rows across the days; returns the total."""
    first = 0
    rng = np.random.default_rng(0)
    for day, n in enumerate(sizes):
        dense = np.column_stack([np.arange(first, first + n), rng.random((n, 2))])
        np.save(directory / f"day_{day}_dense.npy", dense.astype(np.float32))
        np.save(directory / f"day_{day}_sparse.npy", rng.integers(0, 2**31, (n, 3)))
        np.save(directory / f"day_{day}_labels.npy", rng.integers(0, 2, (n, 1)).astype(np.int32))
        first += n
    return first


# ---------------------------------------------------------------- each row exactly once a pass


@pytest.mark.parametrize("kind", ["text", "gz", "days", "npy"])
def test_each_pass_yields_every_row_exactly_once(tmp_path, kind):
    if kind in ("text", "gz"):
        path = tmp_path / ("d.tsv.gz" if kind == "gz" else "d.tsv")
        write_numbered(path, 3001, gz=kind == "gz")
        n, data = 3001, stream(path, workers=3)
    elif kind == "days":
        path = tmp_path / "days"
        path.mkdir()
        write_numbered(path / "day_10.tsv", 900, first=1700)  # natural order: day_2 first
        write_numbered(path / "day_2.tsv.gz", 1200, first=0, gz=True)
        write_numbered(path / "day_3.tsv", 500, first=1200)
        n, data = 2600, stream(path, workers=3)
    else:
        path = tmp_path / "npy"
        path.mkdir()
        n = write_npy_days(path, [1000, 1, 777])
        data = open_stream(
            path,
            SPEC,
            settings=LoaderSettings(stream="on", workers=3, block_bytes=800, shuffle_rows=300),
        )
    assert len(data) == n and len(data.source.blocks) > 3
    assert data.source.blocks[-1].lines < data.source.blocks[0].lines  # an uneven last block
    first, second = pass_numbers(data, seed=5, passes=2)
    for order in (first, second):
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(first, second)  # each pass is shuffled anew
    assert not np.array_equal(first, np.arange(n))


def test_streamed_rows_equal_the_whole_read(tmp_path):
    path = tmp_path / "d.tsv.gz"
    write_numbered(path, 2500, gz=True)
    data = stream(path)
    whole = open_dataset(path, SPEC, dense_transform="none")
    batches = list(data.batches(700, feature_names=NAMES))
    assert [len(b) for b in batches] == [700, 700, 700, 400]
    for i, b in enumerate(batches):
        expected = whole.slice(700 * i, 700 * (i + 1)).to_batch(NAMES)
        assert torch.equal(b.dense, expected.dense) and torch.equal(b.labels, expected.labels)
        assert torch.equal(b.sparse.values(), expected.sparse.values())
        assert torch.equal(b.sparse.lengths(), expected.sparse.lengths())


def test_split_tail_and_slices_are_the_rows_of_the_whole_read(tmp_path):
    path = tmp_path / "d.tsv"
    write_numbered(path, 1003)
    data, whole = stream(path), open_dataset(path, SPEC, dense_transform="none")
    (train, valid), (wtrain, wvalid) = data.split_tail(0.2), whole.split_tail(0.2)
    assert (len(train), len(valid)) == (len(wtrain), len(wvalid)) == (802, 201)
    part = valid.slice(40, 201)
    got = np.concatenate([b.dense[:, 0].numpy() for b in part.batches(64, feature_names=NAMES)])
    np.testing.assert_array_equal(got, wvalid.slice(40, 201).dense[:, 0])
    train_rows = np.concatenate(pass_numbers(train, seed=0))
    np.testing.assert_array_equal(np.sort(train_rows), np.arange(802))  # the tail never trains


# ---------------------------------------------------------------- order: seed, not timing


def test_same_seed_same_order_whatever_the_workers_do(tmp_path, monkeypatch):
    path = tmp_path / "d.tsv"
    write_numbered(path, 2000)
    reference = pass_numbers(stream(path, workers=0), seed=3, passes=2)
    # workers that finish their blocks in varying order
    monkeypatch.setattr(stream_workers, "READ_TASK", "stream_jitter:jittery_read_task")
    for workers in (1, 3):
        got = pass_numbers(stream(path, workers=workers), seed=3, passes=2)
        for a, b in zip(got, reference, strict=True):
            np.testing.assert_array_equal(a, b)
    other = pass_numbers(stream(path, workers=2), seed=4)[0]
    assert not np.array_equal(other, reference[0])


def test_training_batches_are_a_function_of_seed_and_step(tmp_path):
    path = tmp_path / "d.tsv"
    write_numbered(path, 2000)
    data = stream(path)
    with data.train_batches(NAMES, 300, seed=1) as batches:
        run = [next(batches).dense[:, 0].clone() for _ in range(15)]  # 6 steps a pass: 2.5 passes
    assert all(len(b) == 300 for b in run)
    with data.train_batches(NAMES, 300, seed=1, start_step=9) as resumed:
        for k in range(9, 15):
            assert torch.equal(next(resumed).dense[:, 0], run[k])
    pass0 = torch.cat(run[:6]).long().numpy()
    assert len(set(pass0.tolist())) == 1800  # the last 200 rows of a pass (partial batch) dropped


# ---------------------------------------------------------------- memory bounded


def test_shuffle_buffer_never_holds_more_than_its_size(monkeypatch):
    sizes: list[int] = []
    real_push = ShuffleBuffer.push

    def push(self, block):
        out = real_push(self, block)
        sizes.append(self.size)
        assert self._rows is not None and len(self._rows) == self.capacity  # preallocated
        return out

    monkeypatch.setattr(ShuffleBuffer, "push", push)
    buffer = ShuffleBuffer(1000, np.random.default_rng(0))
    seen = []
    for start in range(0, 20_000, 700):  # blocks larger and smaller than what is free
        n = min(700, 20_000 - start)
        block = RowBlock(
            np.zeros(n, np.float32),
            np.arange(start, start + n, dtype=np.float32)[:, None],
            np.zeros((n, 1), np.int64),
        )
        out = buffer.push(block)
        if out is not None:
            seen.append(out.dense[:, 0])
    seen.append(buffer.drain().dense[:, 0])
    assert max(sizes) == 1000 == buffer.max_size
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(20_000))


def _peak_bytes_of_a_pass(data: StreamedData) -> int:
    tracemalloc.start()
    try:
        for _ in data.pass_chunks(seed=0):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_of_a_pass_does_not_grow_with_the_data(tmp_path):
    small, large = tmp_path / "s.tsv", tmp_path / "l.tsv"
    write_numbered(small, 4_000)
    write_numbered(large, 40_000)
    settings = {"workers": 1, "block_bytes": 20_000, "shuffle_rows": 1000}
    a = _peak_bytes_of_a_pass(stream(small, **settings))
    b = _peak_bytes_of_a_pass(stream(large, **settings))
    whole = open_dataset(large, SPEC, dense_transform="none")
    whole_bytes = sum(x.nbytes for x in (whole.dense, whole.labels, *whole.values.values()))
    assert b < 1.3 * a + 200_000 and b < whole_bytes / 2


# ---------------------------------------------------------------- errors and clean-up


def _bad_file(tmp_path, n=5000, bad=2345) -> Path:
    path = tmp_path / "bad.tsv"
    write_numbered(path, n)
    lines = path.read_text().splitlines(keepends=True)
    lines[bad - 1] = "1\t2\tnot-a-number\t3\t4\t5\t6\n"
    path.write_text("".join(lines))
    return path


def test_a_bad_line_in_a_worker_is_one_line_naming_file_and_line(tmp_path):
    path = _bad_file(tmp_path)
    data = stream(path, workers=3)
    started = time.monotonic()
    with pytest.raises(DataError) as caught, data.train_batches(NAMES, 256, seed=0) as batches:
        for _ in range(100):
            next(batches)
    message = str(caught.value)
    assert message.startswith(f"{path}:2345: ") and "\n" not in message
    assert "integer field 2" in message
    assert time.monotonic() - started < 30
    settings = LoaderSettings(stream="on", workers=3, **SMALL)
    skipped = open_stream(path, SPEC, settings=settings, on_bad_line="skip", dense_transform="none")
    rows = np.concatenate(pass_numbers(skipped, seed=0))
    assert sorted(rows.tolist()) == [i for i in range(5000) if i != 2344]


def test_a_truncated_gz_is_an_error_before_any_training(tmp_path):
    path = tmp_path / "d.tsv.gz"
    write_numbered(path, 3000, gz=True)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(DataError, match=r"d.tsv.gz: cannot be read after line \d+"):
        stream(path)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_close_ends_the_workers_and_an_error_leaves_none(tmp_path):
    path = tmp_path / "d.tsv"
    write_numbered(path, 3000)
    data = stream(path, workers=3)
    batches = data.train_batches(NAMES, 128, seed=0)
    next(batches)
    pids = [p for r in stream_workers._open_readers for p in r.pids()]
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    batches.close()
    assert not any(_alive(p) for p in pids)
    bad = stream(_bad_file(tmp_path), workers=2)
    with pytest.raises(DataError):
        list(bad.batches(100, feature_names=NAMES))
    assert not stream_workers._open_readers


def test_a_killed_worker_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "d.tsv"
    write_numbered(path, 5000)
    reader = stream(path, workers=2, prefetch=1).reader(passes=None)
    blocks = iter(reader)
    next(blocks)
    os.kill(reader.pids()[1], signal.SIGKILL)
    with pytest.raises(DqrmError, match=r"data loader worker 1 \(pid \d+\) ended .*SIGKILL"):
        for _ in range(1000):
            next(blocks)
    reader.close()


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from helpers import data_spec
from compress.data.stream import LoaderSettings, open_stream
spec = data_spec({rows!r}, 3)
data = open_stream({path!r}, spec, settings=LoaderSettings(stream="on", workers=2,
                   block_bytes=2000, shuffle_rows=500), dense_transform="none")
from compress.data import stream_workers
batches = data.train_batches(spec.feature_names, 64, seed=0)
next(batches)
pids = [p for r in stream_workers._open_readers for p in r.pids()]
print(" ".join(map(str, pids)), flush=True)
while True:
    time.sleep(0.05)
    next(batches)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_or_killed_main_process_leaves_no_workers(tmp_path, sig):
    path = tmp_path / "d.tsv"
    write_numbered(path, 3000)
    code = _CHILD.format(tests=str(Path(__file__).parent), rows=ROWS, path=str(path))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids), proc.stderr.read()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


# ---------------------------------------------------------------- choosing, and the pipeline


def test_auto_streams_large_text_and_npy_only(tmp_path):
    path = tmp_path / "d.tsv"
    write_numbered(path, 1200)
    read = lambda p, **kw: open_data(p, SPEC, settings=LoaderSettings(**kw))  # noqa: E731
    assert isinstance(read(path, min_rows=1000), StreamedData)
    assert isinstance(read(path, min_rows=1200), Dataset)
    assert isinstance(read(path, stream="off", min_rows=0), Dataset)
    save_npz(open_dataset(path, SPEC), tmp_path / "d.npz")
    assert isinstance(read(tmp_path / "d.npz", stream="on"), Dataset)
    days = tmp_path / "npy"
    days.mkdir()
    write_npy_days(days, [600, 600])
    assert isinstance(read(days, min_rows=1000), StreamedData)
    with pytest.raises(DataError, match="stored 'log3'-transformed, but 'none'"):
        open_data(days, SPEC, settings=LoaderSettings(stream="on"), dense_transform="none")


TEXT_ROWS = (20, 300, 2000, 5000)
TEXT_SPEC = data_spec({f"cat_{i}": r for i, r in enumerate(TEXT_ROWS)}, 5)


@pytest.fixture
def text_world(tmp_path):
    rows = TEXT_ROWS
    config = SyntheticConfig(
        table_sizes=rows, num_samples=12_000, bag_sizes=(1,) * 4, num_dense=5, seed=0
    )
    write_synthetic_criteo(config, tmp_path / "train.tsv")
    ckpt = tmp_path / "model.pt"
    torch.save(make_dlrm(rows=rows).state_dict(), ckpt)
    return ckpt, tmp_path / "train.tsv"


def test_pipeline_fine_tunes_from_a_streamed_text_file(text_world):
    ckpt, data = text_world
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, "int4_qat")
    common = {"data": data, "steps": 12}
    settings = LoaderSettings(stream="on", workers=2, block_bytes=50_000, shuffle_rows=2000)
    streamed = pipeline.compress(job, plan, loader=settings, **common)
    whole = pipeline.compress(job, plan, loader=LoaderSettings(stream="off"), **common)
    assert streamed.loader["mode"] == {"train": "stream", "valid": "stream"}
    assert whole.loader == {"mode": {"train": "memory", "valid": "memory"}}
    assert streamed.loader["workers"] == 2 and streamed.loader["rows_per_second"] > 0
    assert 0 < streamed.timings["data_wait"] < streamed.timings["finetune"]
    assert streamed.data == whole.data  # the same held-out tail and slices, by row numbers
    assert streamed.data["report"] == f"{data}[10080:12000]"
    # the same rows are evaluated: the baseline (before any training) agrees exactly
    assert streamed.metrics["baseline"] == whole.metrics["baseline"]
    assert streamed.train.steps == 12 and streamed.metrics["compressed"]["n"] == 1920


def test_resumed_streamed_fine_tuning_ends_where_an_uninterrupted_one_ends(text_world, tmp_path):
    ckpt, data = text_world
    settings = LoaderSettings(stream="on", workers=2, block_bytes=30_000, shuffle_rows=1500)
    train = open_stream(data, TEXT_SPEC, settings=settings)
    config = TrainConfig(steps=20, batch_size=1024, optimizer="sgd", lr_dense=0.05, seed=3)

    def run(**kw):
        torch.manual_seed(0)
        model = make_dlrm(rows=TEXT_ROWS)
        result = fit(
            model, train, None, TEXT_SPEC.feature_names, config, state_path=tmp_path / "s.pt", **kw
        )
        return model, result

    straight, _ = run()
    run(stop_after=13)  # 11 steps a pass: stopped inside the second pass
    resumed, result = run(resume=True)
    assert result.resumed_from == 13 and result.loader["rows"] > 0
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_valid_that_is_a_copy_of_streamed_data_is_refused(text_world, tmp_path):
    ckpt, data = text_world
    copy = tmp_path / "copy.tsv"
    copy.write_bytes(data.read_bytes())
    job = pipeline.load(ckpt)
    with pytest.raises(DataError, match="the same rows as --data"):
        pipeline.load_data(job, data, copy, loader=LoaderSettings(stream="on"))


def test_batches_of_streamed_rows_feed_a_torchrec_dlrm(tmp_path):
    rows = RowBlock(
        np.array([0, 1], np.float32), np.ones((2, 3), np.float32), np.array([[1, 2, 3], [4, 5, 6]])
    )
    batch = rows_to_batch(rows, NAMES)
    assert batch.sparse.keys() == list(NAMES)
    assert batch.sparse["b"].values().tolist() == [2, 5]
    gz = tmp_path / "x.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write("")
    with pytest.raises(DataError, match="no samples"):
        stream(gz)


def test_cli_json_reports_data_wait_and_loader_rows_per_second(text_world, tmp_path, capsys):
    from compress.cli.main import main

    ckpt, data = text_world
    argv = ["--recipe", "int4_qat", str(ckpt), "--data", str(data), "--steps", "6"]
    argv += ["--out", str(tmp_path / "out"), "--stream", "on", "--loader-workers", "2"]
    argv += ["--shuffle-rows", "3000", "--json", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["timings"]["data_wait"] <= summary["timings"]["finetune"]
    loader = summary["loader"]
    assert loader["mode"] == {"train": "stream", "valid": "stream"}
    assert loader["workers"] == 2 and loader["shuffle_rows"] == 3000
    assert loader["rows"] >= 6 * 2048 and loader["rows_per_second"] > 0
    assert summary["metrics_on"] == {"slice": f"{data}[10080:12000]", "rows": 1920}


def test_id_counts_of_a_stream_equal_the_whole_read(tmp_path):
    path = tmp_path / "d.tsv"
    write_numbered(path, 3000)
    counts = stream(path).id_counts(SPEC)
    whole = pipeline.row_counts(open_dataset(path, SPEC, dense_transform="none"), SPEC)
    assert counts.keys() == whole.keys()
    assert all(torch.equal(counts[k], whole[k]) for k in whole)


def test_a_bad_npy_value_names_its_sample_in_the_file(tmp_path):
    write_npy_days(tmp_path, [1000])
    sparse = np.load(tmp_path / "day_0_sparse.npy")
    sparse[700, 1] = -5
    np.save(tmp_path / "day_0_sparse.npy", sparse)
    settings = LoaderSettings(stream="on", workers=2, block_bytes=800)
    data = open_stream(tmp_path, SPEC, settings=settings)
    with pytest.raises(
        DataError, match=r"day_0_sparse.npy: negative id -5 at sample 700, column 1"
    ):
        list(data.batches(100, feature_names=NAMES))


def test_resuming_with_another_shuffle_buffer_is_refused(tmp_path):
    path = tmp_path / "d.tsv"
    write_numbered(path, 1000)
    assert stream(path).fingerprint() == stream(path, workers=3).fingerprint()
    assert stream(path).fingerprint() != stream(path, shuffle_rows=501).fingerprint()


def test_a_buffer_of_zero_rows_shuffles_within_each_block():
    """``--shuffle-rows 0``: each block's rows come out at once, in a seeded order (the empty
    buffer once crashed reshaping its zero-row arrays)."""
    buffer = ShuffleBuffer(0, np.random.default_rng(0))
    for start in (0, 500):
        block = RowBlock(
            np.zeros(500, np.float32),
            np.arange(start, start + 500, dtype=np.float32)[:, None],
            np.zeros((500, 1), np.int64),
        )
        out = buffer.push(block).dense[:, 0]
        np.testing.assert_array_equal(np.sort(out), np.arange(start, start + 500))
        assert not np.array_equal(out, np.arange(start, start + 500))
    assert buffer.drain() is None and buffer.max_size == 0
