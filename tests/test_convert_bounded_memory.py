"""Convert quantizes every table chunk by chunk: never a float copy of a whole table.

The pipeline's PTQ/convert path runs :func:`compress.quant.fbgemm_rowwise.rowwise_quantize_packed`
and :func:`compress.quant.tablewise.tablewise_quantize_packed`, which hold one chunk of float32
scratch at a time; the chunked bytes are FBGEMM's (row-wise) and DQRM's formula (table-wise),
uneven last chunks included.
"""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import pytest
import torch
from helpers import make_dlrm
from quant_reference import fbgemm_rows, fused_rows, tablewise_codes
from torch.profiler import ProfilerActivity, profile

from compress import pipeline
from compress.quant import fbgemm_rowwise, native, packing, tablewise
from compress.quant.l2_ranges import rowwise_quantize_packed_l2
from compress.quant.packing import unpack_nbit
from compress.quant.tablewise import signed_offset, tablewise_to_rowwise

ROWS = (7, 50, 300, 1000)
DIM = 8
CHUNK = 96  # rows: below the 300- and 1000-row tables, which then end on chunks of 12 and 40 rows


@pytest.fixture
def chunks(monkeypatch) -> list[tuple[int, int]]:
    """Makes the default chunk ``CHUNK`` rows of a dim-``DIM`` table and records ``(rows, dim)``
    of every chunk the quantizers pack (in PyTorch, or in the compiled kernels where built)."""
    monkeypatch.setattr(packing, "CHUNK_ELEMENTS", CHUNK * DIM)
    seen: list[tuple[int, int]] = []
    real = packing.pack_float_codes_into

    def spy(codes, bits, out, acc):
        seen.append(tuple(codes.shape))
        return real(codes, bits, out, acc)

    def compiled_spy(name):
        compiled = getattr(native, name)

        def run(x, *args):
            done = compiled(x, *args)
            if done not in (None, False):
                seen.append(tuple(x.shape))
            return done

        return run

    monkeypatch.setattr(packing, "pack_float_codes_into", spy)
    for name in (
        "rowwise_quantize_into",
        "rowwise_quantize_params_into",
        "tablewise_quantize_into",
    ):
        monkeypatch.setattr(native, name, compiled_spy(name))
    return seen


def _convert(recipe: str):
    model = make_dlrm(rows=ROWS, dim=DIM)
    job = pipeline.load(model)
    result = pipeline.compress(job, pipeline.plan(job, recipe))
    weights = {
        n: m.weight.detach()
        for n, m in model.sparse_arch.embedding_bag_collection.embedding_bags.items()
    }
    return weights, result.model.sparse_arch.embedding_bag_collection.quantized


@pytest.mark.parametrize(
    ("recipe", "bits"), [("int8_ptq", 8), ("int4_rowwise_ptq", 4), ("int2_rowwise_ptq", 2)]
)
def test_rowwise_convert_is_chunked_and_equals_fbgemm(chunks, recipe, bits):
    """Chunked bytes equal the whole table's: FBGEMM's quantizer (min/max ranges) or, for
    ``int2_rowwise_ptq``, the L2 ranges, in the same FBGEMM rows."""
    weights, tables = _convert(recipe)
    expected = [(min(CHUNK, r - s), DIM) for r in ROWS for s in range(0, r, CHUNK)]
    assert chunks == expected  # each table in chunks of at most CHUNK rows, in order
    assert max(m for m, _ in chunks) < max(ROWS)
    for name, w in weights.items():
        t = tables[name]
        rows = fused_rows(t.data, t.scale, t.bias)
        if recipe == "int2_rowwise_ptq":
            whole = rowwise_quantize_packed_l2(w, bits, chunk=max(ROWS))
            assert torch.equal(rows, fused_rows(*whole)), name
        else:
            assert torch.equal(rows, fbgemm_rows(w, bits)), name


def test_tablewise_convert_is_chunked_and_exact(chunks):
    weights, tables = _convert("int4_ptq")
    expected = [(min(CHUNK, r - s), DIM) for r in ROWS for s in range(0, r, CHUNK)]
    assert chunks == expected
    for name, w in weights.items():
        t = tables[name]
        q, s = tablewise_codes(w, 4)
        assert float(t.scale) == s, name
        stored = unpack_nbit(t.data, 4, DIM).to(torch.int16) - signed_offset(4)
        assert torch.equal(stored, q.to(torch.int16)), name
        # and FBGEMM reads the exact row-wise form of the stored codes as q * s
        codes, s16, b16 = tablewise_to_rowwise(q, s, 4)
        rows = fused_rows(fbgemm_rowwise.pack_nbit(codes, 4), s16, b16)
        got = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(rows, 4)
        assert torch.equal(got, q.float() * s), name


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_no_allocation_as_large_as_the_float_table(bits):
    """Before: a float32 ``[R, D]`` temporary of the whole table (``R*D*4`` bytes). Now nothing
    larger than the packed output (``R*D*bits/8``) plus one chunk."""
    w = torch.randn(50_000, 16)
    chunk = 2048
    bound = max(w.shape[0] * 16 * bits // 8, chunk * 16 * 4)
    assert bound < w.numel() * 4
    assert (
        _largest_allocation(lambda: fbgemm_rowwise.rowwise_quantize_packed(w, bits, chunk)) <= bound
    )
    assert (
        _largest_allocation(lambda: tablewise.tablewise_quantize_packed(w, bits, chunk=chunk))
        <= bound
    )
