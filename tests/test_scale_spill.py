"""Converted tables written straight to their artifact files (issue 12, conversion memory).

* Staged conversion (:func:`compress.methods.staged_convert.convert_staged`) gives byte for byte
  the arrays of the whole-table conversion, for every packed layout and width, fp16 and fp32, with
  all-zero rows and chunk boundaries inside a table, from memory and from a memory-mapped file;
  its files are the page-aligned ``.npy`` files the writer would write, hashed as written.
* The main job and ``pipeline.compress(..., staging_dir=...)`` + ``export`` give artifacts
  byte-identical to an in-memory run's; the export moves the staged files into ``tables/`` (the
  same inode: not written twice), leaves the staging directory empty, and no file of the
  directory holds a second copy of a table's bytes. A second export of the same result still
  writes complete, identical artifacts.
* A failure during the export leaves no output, no stage and no staging files; ``recover`` removes
  the staging directory a killed run left, never the one in use.
* :func:`compress.io.staged_arrays.release_pages` takes a staged table's pages out of RSS.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_world

from compress import pipeline
from compress.cli.main import main
from compress.errors import ArtifactError
from compress.io.npy_aligned import PAYLOAD_ALIGNMENT, save_npy_aligned
from compress.io.staged_arrays import (
    NpyWriter,
    map_staged,
    move_or_copy,
    release_pages,
    staged_array_of,
    staged_tensors,
)
from compress.io.table_stream import chunking
from compress.methods import registry
from compress.methods.fp16 import Fp16Config
from compress.methods.keep import KeepConfig
from compress.methods.rowwise import RowwiseConfig
from compress.methods.staged_convert import convert_staged
from compress.methods.tablewise import TablewiseConfig
from exporters.artifacts import atomic_dir
from exporters.export import export
from exporters.onnx import writer as onnx_writer
from exporters.onnx.parity import ParityError

CONFIGS = {
    **{f"rowwise{b}": RowwiseConfig(b) for b in (8, 4, 2)},
    **{f"tablewise{b}": TablewiseConfig(b) for b in (8, 4, 2)},
    # ranges of least L2 error: a search per row, and a table-wise scale found when prepared
    **{f"rowwise{b}_l2": RowwiseConfig(b, ranges="l2") for b in (4, 2)},
    "tablewise2_l2": TablewiseConfig(2, ranges="l2"),
    "fp16": Fp16Config(),
    "fp32": KeepConfig(),
}

#: Every per-table layout and width, a shared group, fine-tuned (QAT) tables among them.
MIXED = """
name = "spill_mixed"
[[tables]]
match = ["t_cat_3"]
method = "qat"
bits = 2
granularity = "row"
[[tables]]
match = ["t_cat_2"]
method = "ptq"
bits = 2
granularity = "table"
[[tables]]
match = ["t_cat_1"]
method = "fp16"
[[tables]]
match = ["*"]
method = "keep"
[finetune]
steps = 3
batch_size = 64
eval_every = 0
"""


def _weights(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Uniform weights with every third row all zero (never-seen ids) and one large row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(rows, dim, generator=g) * 0.2 - 0.1
    w[::3] = 0.0
    w[1] *= 50.0
    return w


def _mapped(tmp_path: Path, w: torch.Tensor) -> torch.Tensor:
    """``w`` as a tensor over a memory-mapped file (as a checkpoint's tables are loaded)."""
    path = tmp_path / "table.bin"
    w.numpy().tofile(path)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="r+", shape=tuple(w.shape)))


def _npy_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    save_npy_aligned(buf, t.detach().contiguous().numpy())
    return buf.getvalue()


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# staged conversion of one table


@pytest.mark.parametrize("layout", sorted(CONFIGS))
@pytest.mark.parametrize(
    ("source", "rows", "chunk"),
    [("memory", 301, 1), ("memory", 301, 37), ("mapped", 17_000, 4_099)],
)
def test_staged_conversion_is_the_whole_table_conversion(tmp_path, layout, source, rows, chunk):
    config = CONFIGS[layout]
    method = registry.for_config(config)
    w = _weights(rows, 16)
    weight = _mapped(tmp_path, w) if source == "mapped" else w
    prepared = method.prepare(config, weight)
    expected = method.convert(prepared, "t").arrays()
    staging = tmp_path / "staging"
    staging.mkdir()
    with chunking(chunk):  # chunk boundaries fall inside the table
        got = convert_staged(prepared, "t", staging).arrays()
    assert list(got) == list(expected)
    files = sorted(staging.iterdir())
    for role, array in got.items():
        assert array.dtype == expected[role].dtype and torch.equal(array, expected[role]), role
        staged = staged_array_of(array)
        if array.dim() == 0:  # a table-wise scale stays in memory
            assert staged is None
            continue
        assert staged is not None and staged.path in files
        data = staged.path.read_bytes()
        assert data == _npy_bytes(expected[role])  # the writer's bytes, payload on a page
        assert staged.offset == PAYLOAD_ALIGNMENT
        assert staged.sha256 == hashlib.sha256(data).hexdigest()
    assert len(files) == sum(a.dim() > 0 for a in got.values())
    assert torch.equal(weight, w)  # the source is left as it was


def test_a_failing_conversion_leaves_no_file(tmp_path):
    method = registry.for_config(RowwiseConfig(4))
    w = _weights(100, 16)
    w[70, 3] = 1e30  # no finite fp16 scale: the quantizer refuses it, chunks in
    prepared = method.prepare(RowwiseConfig(4), w)
    staging = tmp_path / "staging"
    staging.mkdir()
    with chunking(16), pytest.raises(ValueError):
        convert_staged(prepared, "t", staging)
    assert list(staging.iterdir()) == []


def test_writer_refuses_rows_that_do_not_continue_the_array(tmp_path):
    with (
        pytest.raises(ValueError, match="do not continue"),
        NpyWriter(tmp_path, "t", np.uint8, (4, 8)) as w,
    ):
        w.write(np.zeros((2, 7), np.uint8))
    with (
        pytest.raises(ValueError, match="2 of 4 rows"),
        NpyWriter(tmp_path, "t", np.uint8, (4, 8)) as w,
    ):
        w.write(np.zeros((2, 8), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_release_pages_takes_a_staged_table_out_of_rss(tmp_path):
    values = np.arange(8 << 20, dtype=np.uint8).reshape(-1, 64)  # 8 MiB
    with NpyWriter(tmp_path, "t", np.uint8, values.shape) as w:
        w.write(values)
    mapped = map_staged(w.staged)

    def resident() -> int:  # kB of the map's pages in RSS
        start = mapped.data_ptr() - PAYLOAD_ALIGNMENT
        kb, inside = 0, False
        with open("/proc/self/smaps") as f:
            lines = f.readlines()
        for line in lines:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= start < hi
            elif inside and head == "Rss:":
                kb += int(line.split()[1])
        return kb

    assert int(mapped.sum()) == int(values.sum())  # every page read
    assert resident() >= 8 << 10
    assert release_pages([mapped[5:]]) == 1  # a view finds its map
    assert resident() < 1 << 10
    assert np.array_equal(mapped.numpy(), values)  # read again from the file


# --------------------------------------------------------------------------------------------
# the pipeline and the export


@pytest.mark.parametrize("recipe", ["int4_rowwise_ptq", "mixed"])
def test_staged_artifacts_equal_in_memory_ones_and_hold_each_table_once(tmp_path, recipe):
    ckpt, train, valid, _ = tiny_world(tmp_path, n=2000)
    if recipe == "mixed":
        (tmp_path / "mixed.toml").write_text(MIXED)
        recipe = str(tmp_path / "mixed.toml")
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, recipe)
    kwargs = dict(data=train, valid=valid, chunk_rows=7)
    in_memory = pipeline.compress(job, plan, **kwargs)
    assert staged_tensors(in_memory.model) == []
    staging = tmp_path / "staging"
    staging.mkdir()
    staged = pipeline.compress(job, plan, staging_dir=staging, **kwargs)
    tensors = staged_tensors(staged.model)
    assert tensors and len(list(staging.iterdir())) == len(tensors)
    inodes = {staged_array_of(t).path.stat().st_ino for t in tensors}

    export(in_memory, tmp_path / "memory")
    export(staged, tmp_path / "staged")
    assert _digests(tmp_path / "staged") == _digests(tmp_path / "memory")
    assert list(staging.iterdir()) == []  # every staged file moved into tables/
    tables = sorted((tmp_path / "staged" / "tables").iterdir())
    moved = {p.stat().st_ino for p in tables}
    assert inodes <= moved and all(p.stat().st_nlink == 1 for p in tables)
    # no second copy of any table's bytes anywhere in the directory
    files = {p: p.read_bytes() for p in (tmp_path / "staged").rglob("*") if p.is_file()}
    for table in tables:
        payload = files[table][PAYLOAD_ALIGNMENT:]
        if len(payload) < 64:
            continue
        holders = [p.name for p, data in files.items() if payload in data]
        assert holders == [table.name], holders
    # the maps stay valid after their files moved: a second export writes the same artifacts
    export(staged, tmp_path / "again")
    assert _digests(tmp_path / "again") == _digests(tmp_path / "memory")


def _hidden(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_a_failed_export_leaves_no_output_and_no_staged_files(tmp_path, capsys, monkeypatch):
    ckpt, _, _, _ = tiny_world(tmp_path, n=500)
    seen = {}

    def failing_parity(reference, spec, gspec, root, paths, config):
        seen["beside"] = _hidden(tmp_path, "out")
        seen["tables"] = sorted(p.name for p in (root / "tables").iterdir())
        seen["staged"] = [staged_array_of(t) for t in staged_tensors(reference)]
        raise ParityError("forced for the test")

    monkeypatch.setattr(onnx_writer, "check_parity", failing_parity)
    code = main(
        ["--no-progress", "compress", str(ckpt), "--recipe", "int4_rowwise_ptq"]
        + ["--out", str(tmp_path / "out"), "--json"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "forced for the test" in err and err.count("\n") == 1
    # while the export ran: the staged tables had been moved into the stage
    assert any(n.startswith(".out.tables-") for n in seen["beside"])
    assert any(n.startswith(".out.partial-") for n in seen["beside"])
    assert seen["staged"] and all(s is not None for s in seen["staged"])
    assert len(seen["tables"]) == 3 * 4  # data, scale, bias of 4 tables
    # afterwards: nothing
    assert not (tmp_path / "out").exists()
    assert _hidden(tmp_path, "out") == []


def test_recover_removes_a_killed_runs_staging_not_the_one_in_use(tmp_path):
    out = tmp_path / "out"
    left = tmp_path / ".out.tables-k1ll3d_x"
    left.mkdir()
    (left / "t_cat_0.data.abc.npy").write_bytes(b"\x93NUMPY half")
    with atomic_dir.output_lock(out), atomic_dir.table_staging(out) as live:
        (live / "t.npy").write_bytes(b"x")
        removed = atomic_dir.recover(out).removed
        assert removed == (left,) and not left.exists()
        assert live.is_dir() and (live / "t.npy").exists()
    assert not live.exists() and _hidden(tmp_path, "out") == []


def test_a_full_disk_while_staging_names_the_output(tmp_path):
    out = tmp_path / "out"
    with atomic_dir.table_staging(out) as tables:
        with pytest.raises(ArtifactError) as e, atomic_dir.table_errors(out, tables):
            raise OSError(28, "No space left on device", str(tables / "t.npy"))
        assert str(e.value) == f"{out}: no space left on device"
        with pytest.raises(OSError), atomic_dir.table_errors(out, tables):  # not its file
            raise OSError(28, "No space left on device", str(tmp_path / "elsewhere"))


def test_a_staged_file_that_changed_is_not_moved(tmp_path):
    with NpyWriter(tmp_path, "t", np.uint8, (2, 8)) as w:
        w.write(np.ones((2, 8), np.uint8))
    os.utime(w.staged.path, ns=(0, 0))  # touched since it was written
    with pytest.raises(ValueError, match="changed"):
        move_or_copy(w.staged, tmp_path / "dest.npy")
    assert not (tmp_path / "dest.npy").exists()
