"""Review of da92f78: bounded, checked report inputs; trusted hashes that a swapped file cannot
keep; bounds on what other ranks send; size checks before the compiled kernels write; and the
per-batch and per-run work the pipeline no longer does when nothing needs it.

Each test fails on the code as it was: a traceback (``RecursionError``, ``ValueError``) where a
one-line :class:`ArtifactError` is due, a NaN accepted, a stale sha256 recorded for a changed
file, a peer's bad count or row id taken in, a packed buffer of the wrong size written past, a
``/proc`` read per table and lookup, or a pass over every table for a report nobody writes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_inputs, tiny_world

from compress import pipeline
from compress.errors import ArtifactError
from compress.io.staged_arrays import NpyWriter, move_or_copy
from compress.quant import native
from compress.train.distributed.failures import read_record
from compress.train.distributed.grad_exchange import ExchangeSettings, GradExchange
from compress.train.distributed.wire import SparseLayout
from exporters.artifacts.manifest_integrity import decode_manifest
from exporters.artifacts.write import KnownFile, _identity, checksums
from exporters.report import inputs as report_inputs
from exporters.report.data import MAX_BINS, build_report
from exporters.report.inputs import ReportInputs, parse_report_data, parse_train_log

LOG = Path("out/train_log.jsonl")
DATA = Path("out/report_data.json")

# --------------------------------------------------------------------------------------------
# report inputs


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"step": 1, "loss": NaN, "metrics": null}', "loss: expected a finite number"),
        ('{"step": 1, "loss": 1.0, "metrics": {"auc": Infinity, "logloss": 1}}', "metrics.auc"),
        ('{"step": 1' + "0" * 5000 + ', "loss": 1.0, "metrics": null}', "broken JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"step": 1, "step": 2}', "given twice"),
    ],
)
def test_train_log_values_are_one_line_naming_the_line(line, expected):
    text = '{"step": 0, "loss": null, "metrics": null}\n' + line + "\n"
    with pytest.raises(ArtifactError, match=expected) as e:
        parse_train_log(text, LOG)
    assert str(e.value).startswith(f"{LOG}:2") and "\n" not in str(e.value)


def test_train_log_entries_are_bounded(monkeypatch):
    monkeypatch.setattr(report_inputs, "MAX_LOG_ENTRIES", 3)
    line = '{"step": 1, "loss": 1.0, "metrics": null}\n'
    assert len(parse_train_log(line * 3, LOG)) == 3
    with pytest.raises(ArtifactError, match=rf"{LOG}:4: more than 3 entries"):
        parse_train_log(line * 4, LOG)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"version": 1' + "0" * 5000 + "}", "broken JSON"),
        ('{"version": [' + "1," * 1000 + "1]}", "version \\[1, 1,"),
    ],
)
def test_report_data_decoding_is_one_line_naming_the_file(text, expected):
    with pytest.raises(ArtifactError, match=expected) as e:
        parse_report_data(text, DATA)
    assert str(e.value).startswith(str(DATA)) and len(str(e.value)) < 400


def test_a_manifest_with_an_integer_too_long_is_one_line():
    with pytest.raises(ArtifactError, match="manifest.json: broken JSON"):
        decode_manifest(b'{"a": 1' + b"0" * 5000 + b"}", "manifest.json")


def test_report_input_files_are_bounded_before_they_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(report_inputs, "MAX_INPUT_BYTES", 100)
    (tmp_path / "report_data.json").write_text('{"version": 1, "pad": "' + "x" * 200 + '"}')
    with pytest.raises(ArtifactError, match="report_data.json: more than 0 MiB, refused"):
        report_inputs.stage_inputs(tmp_path, {})


def _scores_report(negatives, positives, sums) -> ReportInputs:
    hist = {"negatives": negatives, "positives": positives, "probability_sums": sums}
    data = {
        "version": 1,
        "plan_tables": [],
        "checkpoint": {"sha256": "0" * 64, "of": "x"},
        "scores": {"slice": "s", "baseline": hist, "compressed": hist},
        "reconstruction": {"weights": None, "note": None, "tables": []},
        "selection_baseline": None,
    }
    return ReportInputs(manifest={"tables": []}, train_log=None, report_data=data)


def test_score_histograms_are_bounded_in_bins_and_counts():
    ok = build_report(_scores_report([1, 0], [0, 1], [0.1, 0.9]))
    assert ok.scores is not None
    n = MAX_BINS + 1
    with pytest.raises(ArtifactError, match=f"1 to {MAX_BINS:,}"):
        build_report(_scores_report([1] * n, [1] * n, [0.5] * n))
    # a count past int64 was an OverflowError from numpy
    with pytest.raises(ArtifactError, match="below 2\\*\\*53"):
        build_report(_scores_report([10**30, 0], [0, 1], [0.1, 0.9]))


# --------------------------------------------------------------------------------------------
# trusted hashes


def _set_back_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_stage_file_rewritten_with_its_old_mtime_is_hashed_again(tmp_path):
    f = tmp_path / "tables" / "t.npy"
    f.parent.mkdir()
    f.write_bytes(b"a" * 64)
    import hashlib

    known = {"tables/t.npy": KnownFile(hashlib.sha256(b"a" * 64).hexdigest(), _identity(f))}
    mtime = f.stat().st_mtime_ns
    time.sleep(0.02)  # past the file system's timestamp granularity
    f.write_bytes(b"b" * 64)  # same size, same inode
    _set_back_mtime(f, mtime)
    assert checksums(tmp_path, known)["tables/t.npy"]["sha256"] == (
        hashlib.sha256(b"b" * 64).hexdigest()
    )


def test_a_staged_file_rewritten_with_its_old_mtime_is_not_moved_with_its_old_hash(tmp_path):
    with NpyWriter(tmp_path, "t", np.float32, (4, 4)) as w:
        w.write(np.zeros((4, 4), np.float32))
    staged = w.staged
    time.sleep(0.02)
    with open(staged.path, "r+b") as f:
        f.seek(staged.offset)
        f.write(b"\x01" * 4)
    _set_back_mtime(staged.path, staged.mtime_ns)
    with pytest.raises(ValueError, match="changed"):
        move_or_copy(staged, tmp_path / "moved.npy")


def test_a_staged_name_pointed_at_another_file_during_the_move_is_refused(tmp_path, monkeypatch):
    with NpyWriter(tmp_path, "t", np.float32, (4, 4)) as w:
        w.write(np.zeros((4, 4), np.float32))
    staged = w.staged
    other = tmp_path / "other.npy"
    other.write_bytes(staged.path.read_bytes())
    real_rename = os.rename

    def swapped(src, dst):  # the swap lands between the check and the rename
        real_rename(other, src)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", swapped)
    with pytest.raises(ValueError, match="replaced while it was moved"):
        move_or_copy(staged, tmp_path / "moved.npy")


# --------------------------------------------------------------------------------------------
# what other ranks send


def test_wire_refuses_negative_row_counts():
    layout = SparseLayout((4, 4), 32)
    with pytest.raises(ValueError, match="negative"):
        layout.decode(torch.empty(0, dtype=torch.uint8), [1, -1])


class _Comm:
    """One peer whose header and message are given; this rank (0) sends nothing."""

    def __init__(self, header: torch.Tensor, message: torch.Tensor) -> None:
        self.ctx = type("Ctx", (), {"device": torch.device("cpu"), "rank": 0})()
        self.peer_header, self.peer_message = header, message

    def all_gather(self, tensor, purpose):
        return [tensor, self.peer_header]

    def all_gather_padded(self, tensor, lengths, purpose):
        return [tensor[: lengths[0]], self.peer_message[: lengths[1]]]


def _exchange(peer_header, peer_message) -> GradExchange:
    table = torch.nn.Parameter(torch.zeros(10, 4))
    table.grad = torch.sparse_coo_tensor(
        torch.tensor([[1]]), torch.ones(1, 4), (10, 4), check_invariants=True
    )
    return GradExchange([table], [], _Comm(peer_header, peer_message), ExchangeSettings())


def test_a_peer_announcing_more_rows_than_its_table_has_is_refused():
    header = torch.tensor([2**40, 0], dtype=torch.int64)  # would be a 2**40-row message
    with pytest.raises(RuntimeError, match="rank 1 announced 1099511627776 rows"):
        _exchange(header, torch.empty(0, dtype=torch.uint8)).step(0.0)


def test_a_peer_sending_rows_outside_its_table_is_refused():
    layout = SparseLayout((4,), 32)
    message = layout.encode([(torch.tensor([12]), torch.ones(1, 4))])  # table of 10 rows
    header = torch.tensor([1, 0], dtype=torch.int64)
    with pytest.raises(RuntimeError, match="rank 1 sent embedding rows outside their tables"):
        _exchange(header, message).step(0.0)


def test_failure_records_are_one_line_and_deep_nesting_is_no_record():
    deep = {"message": {"message": "x", "extraInfo": {"dqrm": "[" * 100_000 + "]" * 100_000}}}
    assert read_record(deep) is None
    record = {"kind": "error", "rank": 1, "exit_code": 2, "time": "1.0"}
    data = {
        "message": {"message": "bad input\nTraceback...", "extraInfo": {"dqrm": json.dumps(record)}}
    }
    assert read_record(data)["message"] == "bad input"


# --------------------------------------------------------------------------------------------
# compiled kernels


@pytest.mark.skipif(not native.enabled(), reason="compiled kernels unavailable")
def test_packing_kernels_refuse_outputs_of_the_wrong_size():
    x = torch.randn(4, 8)
    scale, bias = torch.empty(4, dtype=torch.float16), torch.empty(4, dtype=torch.float16)
    with pytest.raises(ValueError, match="cannot pack 4-bit codes"):
        native.rowwise_quantize_into(x, 4, torch.empty(4, 3, dtype=torch.uint8), scale, bias)
    with pytest.raises(ValueError, match="per-row outputs"):
        native.rowwise_quantize_into(x, 4, torch.empty(4, 4, dtype=torch.uint8), scale[:2], bias)
    with pytest.raises(ValueError, match="cannot pack 8-bit codes"):
        native.tablewise_quantize_into(x, 0.1, 8, torch.empty(2, 8, dtype=torch.uint8))
    assert (
        native.rowwise_quantize_into(x, 4, torch.empty(4, 4, dtype=torch.uint8), scale, bias) == -1
    )


# --------------------------------------------------------------------------------------------
# work that need not be done


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("review_world"))


def test_resident_memory_is_checked_once_a_batch_not_once_a_table(world, monkeypatch):
    from compress.methods import qat_embedding
    from compress.methods.apply_plan import prepare_model

    ckpt, *_ = world
    job = pipeline.load(ckpt)
    model, _ = prepare_model(job.module, job.spec, pipeline.plan(job, "int4_qat"))
    ebc = model.sparse_arch.embedding_bag_collection
    calls = []
    monkeypatch.setattr(qat_embedding, "cow_map_of", lambda t: object())
    monkeypatch.setattr(qat_embedding, "prefault", lambda cow, ids, write: None)
    monkeypatch.setattr(ebc._resident, "check", lambda: calls.append(1) or 0)
    ebc(random_inputs(model)[1])
    assert len(ebc.tables) > 1 and len(calls) == 1


def test_the_report_pass_runs_only_when_asked(world, monkeypatch):
    from compress import report_data

    ckpt, train, valid, _ = world
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, "int8_ptq")
    passes = []
    real = report_data.measure_tables
    monkeypatch.setattr(
        report_data, "measure_tables", lambda *a, **k: passes.append(1) or real(*a, **k)
    )
    assert pipeline.compress(job, plan, valid=valid).report_data is None
    assert passes == []
    result = pipeline.compress(job, plan, valid=valid, collect_report=True)
    assert passes == [1] and result.report_data["version"] == 1
