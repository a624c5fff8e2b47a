"""Streaming conversion: tables read from the memory-mapped checkpoint chunk by chunk.

Chunked conversion is byte-identical to whole-table conversion (and to FBGEMM) for every layout
and bit width, all-zero rows, rows whose min is exactly 0 and chunk boundaries inside a table
included, on the compiled and the PyTorch path; a memory-mapped table is read from its file
without mapping its pages; PTQ does not copy the tables it does not train; the chunk size is a
validated setting (``--chunk-rows``, ``pipeline.compress(chunk_rows=...)``).
"""

from __future__ import annotations

import os

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import pytest
import torch
from helpers import make_dlrm
from quant_reference import fbgemm_rows, fused_rows, tablewise_codes
from torch.profiler import ProfilerActivity, profile

from compress import pipeline, progress
from compress.cli.main import main
from compress.errors import SettingError
from compress.io import table_stream
from compress.io.table_stream import (
    check_chunk_rows,
    chunking,
    copy_rows,
    file_range,
    row_chunks,
)
from compress.methods.apply_plan import embedding_parts, prepare_model
from compress.quant import native
from compress.quant.fbgemm_rowwise import rowwise_quantize_packed
from compress.quant.packing import unpack_nbit
from compress.quant.tablewise import (
    chunks_absmax,
    scale_from_absmax,
    signed_offset,
    table_scale,
    tablewise_quantize_packed,
)

TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"


def _tricky(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Rows of every kind the row-wise rule treats apart: random, all +0.0, all -0.0, +0.0 and
    -0.0 mixed, min exactly 0 with positive values, -0.0 as the only zero beside positives,
    ties at half steps, one value repeated."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g) * 0.05
    kinds = torch.arange(rows) % 8
    pos, neg = torch.tensor(0.0), torch.tensor(-0.0)
    mixed = torch.where(torch.rand(rows, dim, generator=g) < 0.5, neg, pos)
    positive = w.abs() + 0.01
    w[kinds == 1] = 0.0
    w[kinds == 2] = -0.0
    w[kinds == 3] = mixed[kinds == 3]
    with_zero = torch.where(torch.rand(rows, dim, generator=g) < 0.3, mixed, positive)
    w[kinds == 4] = with_zero[kinds == 4]
    only_neg_zero = positive.clone()
    only_neg_zero[:, dim // 2] = -0.0
    w[kinds == 5] = only_neg_zero[kinds == 5]
    ties = torch.randint(-40, 40, (rows, dim), generator=g).float() * 2**-7
    w[kinds == 6] = ties[kinds == 6]
    w[kinds == 7] = 0.25
    return w


@pytest.fixture(autouse=True)
def read_small_tables_from_their_file(monkeypatch):
    """The tables here are small: read them from their file as big ones are."""
    monkeypatch.setattr(table_stream, "MIN_FILE_READ_BYTES", 0)


@pytest.fixture(params=["compiled", "pytorch"])
def path(request, monkeypatch) -> str:
    """Each quantizer once through the compiled kernels (a chunk's rows split over 3 threads)
    and once through PyTorch ops."""
    if request.param == "compiled":
        if not native.enabled():
            pytest.skip("the compiled kernels cannot be built here")
        monkeypatch.setattr(native, "PARALLEL_MIN_ROWS", 16)
        threads = torch.get_num_threads()
        torch.set_num_threads(3)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    else:
        monkeypatch.setattr(native, "_kernels", lambda: None)
    return request.param


def _mapped(tmp_path, w: torch.Tensor) -> torch.Tensor:
    """``w`` saved with torch.save and loaded memory-mapped, as checkpoints are."""
    torch.save({"w": w}, tmp_path / "w.pt")
    return torch.load(tmp_path / "w.pt", mmap=True, weights_only=True)["w"]


LAYOUTS = [(bits, dim) for bits in (8, 4, 2) for dim in (8, 16, 24, 64)]


@pytest.mark.parametrize(("bits", "dim"), LAYOUTS)
def test_rowwise_streamed_chunks_equal_whole_table_and_fbgemm(tmp_path, path, bits, dim):
    w = _tricky(203, dim)
    mapped = _mapped(tmp_path, w)
    assert file_range(mapped) is not None
    whole = rowwise_quantize_packed(w, bits, chunk=10_000)
    for chunk in (1, 7, 64, 202, 203):  # boundaries inside the table, and one chunk of all rows
        got = rowwise_quantize_packed(mapped, bits, chunks=row_chunks(mapped, chunk))
        for a, b in zip(got, whole, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (chunk, a.dtype)
    assert torch.equal(fused_rows(*whole), fbgemm_rows(w, bits))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [4, 8, 16, 64])
def test_tablewise_streamed_chunks_equal_whole_table(tmp_path, path, bits, dim):
    w = _tricky(203, dim, seed=1)
    mapped = _mapped(tmp_path, w)
    scale = chunks_absmax(row_chunks(mapped, 5))
    assert table_scale(w, bits) == table_scale(torch.tensor([scale]), bits)
    whole, s = tablewise_quantize_packed(w, bits)
    q, _ = tablewise_codes(w, bits, s)  # DQRM's formula, written apart
    assert torch.equal(unpack_nbit(whole, bits, dim).to(torch.int16) - signed_offset(bits), q)
    for chunk in (1, 7, 203):
        got, _ = tablewise_quantize_packed(mapped, bits, s, chunks=row_chunks(mapped, chunk))
        assert torch.equal(got, whole), chunk


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
def test_a_row_beyond_fp16_is_refused_on_both_paths(path, bad):
    w = torch.randn(200, 16)
    w[150, 3] = bad  # 1e6: finite, but no fp16 bias can hold the row's min or max
    w[150, 4] = -bad
    with pytest.raises(ValueError, match="not finite in fp16"):
        rowwise_quantize_packed(w, 4, chunk=64)


def test_chunks_must_cover_the_table_in_order():
    w = torch.randn(10, 8)
    chunks = [(0, 4, w[:4]), (5, 10, w[5:])]
    with pytest.raises(ValueError, match="does not continue rows 0:4"):
        rowwise_quantize_packed(w, 4, chunks=chunks)
    with pytest.raises(ValueError, match="covered rows 0:4 of a table of 10 rows"):
        tablewise_quantize_packed(w, 4, 1.0, chunks=chunks[:1])


def test_zero_rows_take_no_table_sized_temporaries(monkeypatch):
    """Before: all-zero rows went through int64 copies of themselves (8x the rows' bytes, 74% of a
    Kaggle-shaped conversion). Now no allocation exceeds one chunk of float32."""
    monkeypatch.setattr(native, "_kernels", lambda: None)
    w = torch.zeros(40_000, 16)
    w[::5] = torch.randn(8000, 16)
    chunk = 4096
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        packed, scale, bias = rowwise_quantize_packed(w, 4, chunk)
    largest = max((e.self_cpu_memory_usage for e in prof.events()), default=0)
    assert largest <= max(chunk * 16 * 4, packed.numel())
    assert torch.equal(fused_rows(packed, scale, bias), fbgemm_rows(w, 4))


# --------------------------------------------------------------------------------------------------
# Reading a memory-mapped table


def test_file_range_finds_the_bytes_of_a_mapped_tensor(tmp_path):
    mapped = _mapped(tmp_path, torch.arange(600, dtype=torch.float32).reshape(100, 6))
    where = file_range(mapped[10:])
    assert where is not None and where.nbytes == 90 * 6 * 4
    with open(where.path, "rb") as f:
        f.seek(where.offset)
        raw = np.frombuffer(f.read(where.nbytes), dtype=np.float32)
    assert np.array_equal(raw, mapped[10:].numpy().reshape(-1))
    assert file_range(torch.zeros(100, 6)) is None  # memory
    assert file_range(mapped[:, :3]) is None  # not contiguous
    memmap = np.lib.format.open_memmap(tmp_path / "a.npy", "w+", np.float32, (50, 4))
    assert file_range(torch.from_numpy(memmap)) is not None


def test_a_moved_or_deleted_file_is_still_read_right(tmp_path):
    mapped = _mapped(tmp_path, torch.ones(64, 8))
    os.replace(tmp_path / "w.pt", tmp_path / "old.pt")
    torch.save({"w": torch.zeros(64, 8)}, tmp_path / "w.pt")  # another file at the path
    assert file_range(mapped).path == str(tmp_path / "old.pt")  # the mapped file, moved
    assert torch.equal(copy_rows(mapped), torch.ones(64, 8))
    os.unlink(tmp_path / "old.pt")
    assert file_range(mapped) is None  # deleted: read through the mapping
    assert torch.equal(copy_rows(mapped), torch.ones(64, 8))


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_streamed_conversion_maps_none_of_the_tables_pages(tmp_path):
    """A mapped file's resident pages count toward RSS: quantizing a 64 MiB memory-mapped table
    used to leave all of it resident; now it is read through one chunk buffer."""
    w = torch.rand(1 << 20, 16)
    mapped = _mapped(tmp_path, w)
    before = _rss_file_kib()
    packed, scale, bias = rowwise_quantize_packed(mapped, 4, chunks=row_chunks(mapped))
    s = scale_from_absmax(chunks_absmax(row_chunks(mapped)), 4)
    tablewise_quantize_packed(mapped, 4, s, chunks=row_chunks(mapped))
    grew = _rss_file_kib() - before
    assert grew < 8 * 1024, f"{grew} KiB of the mapped table became resident"
    assert torch.equal(fused_rows(packed, scale, bias), fbgemm_rows(w, 4))


def test_copy_rows_copies_a_mapped_table(tmp_path):
    w = torch.randn(1000, 8)
    mapped = _mapped(tmp_path, w)
    with chunking(3):
        out = copy_rows(mapped)
    assert torch.equal(out, w) and out.data_ptr() != mapped.data_ptr()


# --------------------------------------------------------------------------------------------------
# The pipeline


def _checkpoint(tmp_path, rows=(7, 50, 300, 1000), dim=8):
    model = make_dlrm(rows=rows, dim=dim)
    state = model.state_dict()
    for i, name in enumerate(f"t_cat_{i}" for i in range(len(rows))):
        table = state[TABLE.format(name)]
        table[i % 3 :: 3] = 0.0  # never-seen ids: all-zero rows
        table[1::7, 0] = -0.0
    torch.save(state, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt", state


def _arrays(result) -> dict[str, bytes]:
    out = {}
    for part in embedding_parts(result.model):
        for name, table in part.quantized.items():
            for role, array in table.arrays().items():
                out[f"{name}.{role}"] = array.contiguous().numpy().tobytes()
    return out


FP16_RECIPE = """
name = "half"
[[tables]]
match = ["*"]
method = "fp16"
"""


@pytest.mark.parametrize("recipe", ["int8_ptq", "int4_rowwise_ptq", "int4_ptq", "fp16"])
def test_pipeline_chunk_size_changes_no_byte(tmp_path, recipe):
    path, state = _checkpoint(tmp_path)
    if recipe == "fp16":
        (tmp_path / "half.toml").write_text(FP16_RECIPE)
        recipe = str(tmp_path / "half.toml")
    job = pipeline.load(path)
    plan = pipeline.plan(job, recipe)
    default = _arrays(pipeline.compress(job, plan))
    for rows in (1, 7, 96):
        assert _arrays(pipeline.compress(job, plan, chunk_rows=rows)) == default, rows
    live = pipeline.load(make_dlrm())  # the same weights from memory, not from the file
    live.module.load_state_dict(state)
    assert _arrays(pipeline.compress(live, pipeline.plan(live, recipe))) == default


def test_the_chunk_setting_reaches_every_table(tmp_path, monkeypatch):
    path, _ = _checkpoint(tmp_path)
    job = pipeline.load(path)
    seen: list[tuple[int, int]] = []
    real = table_stream.row_chunks

    def spy(t, chunk=None):
        for start, stop, rows in real(t, chunk):
            seen.append((t.shape[0], stop - start))
            yield start, stop, rows

    # the methods import row_chunks from table_stream when they convert (they load without torch)
    monkeypatch.setattr(table_stream, "row_chunks", spy)
    pipeline.compress(job, pipeline.plan(job, "int4_rowwise_ptq"), chunk_rows=64)
    assert {rows for rows, _ in seen} == {7, 50, 300, 1000}
    assert max(m for _, m in seen) == 64 and (1000, 1000 - 15 * 64) in seen


def test_ptq_reads_the_checkpoints_tables_without_copying_them(tmp_path):
    path, _ = _checkpoint(tmp_path)
    job = pipeline.load(path)
    loaded = {
        n: m.weight.data_ptr()
        for n, m in job.module.sparse_arch.embedding_bag_collection.embedding_bags.items()
    }
    for recipe, copied in (("int4_rowwise_ptq", False), ("int4_qat", True)):
        prepared, _ = prepare_model(job.module, job.spec, pipeline.plan(job, recipe))
        tables = prepared.sparse_arch.embedding_bag_collection.embedding_bags
        for name, table in tables.items():
            shares = table.weight.data_ptr() == loaded[name]
            assert shares != copied, (recipe, name)
            assert table.weight.requires_grad == copied


def test_fine_tuning_leaves_the_loaded_tables_as_they_were(tmp_path):
    path, state = _checkpoint(tmp_path, rows=(7, 50, 300))
    job = pipeline.load(path)
    pipeline.compress(job, pipeline.plan(job, "int4_qat"), steps=3)
    for name, module in job.module.sparse_arch.embedding_bag_collection.embedding_bags.items():
        assert torch.equal(module.weight, state[TABLE.format(name)]), name


def test_convert_shows_a_progress_bar(tmp_path, capsys):
    path, _ = _checkpoint(tmp_path)
    job = pipeline.load(path)
    progress.set_enabled(True)
    try:
        pipeline.compress(job, pipeline.plan(job, "int4_rowwise_ptq"))
    finally:
        progress.set_enabled(None)
    assert "convert" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The setting


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "64"])
def test_chunk_rows_must_be_a_positive_whole_number(tmp_path, bad):
    with pytest.raises(SettingError, match="chunk_rows must be a positive whole number"):
        check_chunk_rows(bad)
    with pytest.raises(SettingError), chunking(bad):
        pass
    job = pipeline.load(make_dlrm())
    with pytest.raises(SettingError):
        pipeline.compress(job, pipeline.plan(job, "int8_ptq"), chunk_rows=bad)
    assert check_chunk_rows(None) is None and check_chunk_rows(7) == 7


def test_cli_refuses_a_bad_chunk_size_in_one_line(tmp_path, capsys):
    path, _ = _checkpoint(tmp_path)
    out = tmp_path / "out"
    rc = main(
        ["compress", str(path), "--recipe", "int8_ptq", "--out", str(out), "--chunk-rows", "0"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--chunk-rows" in err and not out.exists()
