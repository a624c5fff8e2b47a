"""Tests of compress.quant.math: bit-exact against FBGEMM's CPU ops and TorchRec's quantized EBC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compress.quant import math as qm

fbgemm_gpu = pytest.importorskip("fbgemm_gpu")
OPS = torch.ops.fbgemm

ROWS = 192
# Dims FBGEMM's quantize op accepts (dim*bits/8 even), the usual ones plus a few odd-ish ones.
DIMS = {
    8: [8, 16, 64, 128, 2, 6, 10, 34],
    4: [8, 16, 64, 128, 4, 12, 20, 36],
    2: [8, 16, 64, 128, 24, 40, 72],
}
BITS_DIMS = [(b, d) for b, ds in DIMS.items() for d in ds]


def _table(kind: str, rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + dim)
    if kind == "normal":
        return torch.randn(rows, dim, generator=g)
    if kind == "constant":
        return (torch.randn(rows, 1, generator=g) * 100).expand(rows, dim).contiguous()
    if kind == "constant_not_fp16":  # fp16(min) > min: negative range, negative scale
        return torch.full((rows, dim), 1000.3) + torch.arange(rows).unsqueeze(1) * 0.01
    if kind == "repeated":
        return torch.randint(-3, 4, (rows, dim), generator=g).float() * 0.37
    if kind == "large":
        return torch.randn(rows, dim, generator=g).clamp_(-6, 6) * 1e4
    if kind == "near_fp16_max":
        return (torch.rand(rows, dim, generator=g) * 2 - 1) * 6.0e4
    if kind == "tiny":
        return torch.randn(rows, dim, generator=g) * 1e-6
    if kind == "subnormal_scale":
        return torch.randn(rows, dim, generator=g) * 1e-9
    if kind == "negative":
        return -torch.rand(rows, dim, generator=g) * 5 - 0.5
    if kind == "signed_zeros":
        base = torch.rand(rows, dim, generator=g)
        zero = torch.rand(rows, dim, generator=g) < 0.3
        neg = torch.rand(rows, dim, generator=g) < 0.5
        zeros = torch.where(neg, torch.tensor(-0.0), torch.tensor(0.0))
        return torch.where(zero, zeros, base)
    if kind == "grid":  # many exact .5 ties in (x - min) / scale
        return torch.randint(0, 31, (rows, dim), generator=g).float() / 30
    raise AssertionError(kind)


KINDS = [
    "normal",
    "constant",
    "constant_not_fp16",
    "repeated",
    "large",
    "near_fp16_max",
    "tiny",
    "subnormal_scale",
    "negative",
    "signed_zeros",
    "grid",
]


# ------------------------------------------------------------------------------------------------
# Row-wise: bit-exact against FBGEMM
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,dim", BITS_DIMS)
def test_rowwise_matches_fbgemm_bytes_and_values(bits: int, dim: int) -> None:
    for kind in KINDS:
        w = _table(kind, ROWS, dim)
        ref = OPS.FloatToFusedNBitRowwiseQuantizedSBHalf(w, bits)
        ref_deq = OPS.FusedNBitRowwiseQuantizedSBHalfToFloat(ref, bits)

        q, scale, bias = qm.rowwise_quantize(w, bits)
        rows = qm.to_fbgemm_rows(q, scale, bias, bits)
        assert torch.equal(rows, ref), kind
        assert torch.equal(qm.quantize_rows_chunked(w, bits, chunk_rows=50), ref), kind

        s16, b16 = qm.rowwise_qparams(w, bits)
        assert torch.equal(s16.view(torch.int16), scale.view(torch.int16)), kind
        assert torch.equal(b16.view(torch.int16), bias.view(torch.int16)), kind

        q2, s2, b2 = qm.from_fbgemm_rows(ref, bits, dim)
        assert torch.equal(q2, q), kind
        deq = qm.rowwise_dequantize(q2, s2, b2)
        torch.testing.assert_close(deq, ref_deq, atol=0, rtol=0)
        assert torch.equal(deq, ref_deq), kind
        assert torch.equal(qm.fake_quantize_rowwise(w, bits), ref_deq), kind


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rowwise_half_input_matches_fbgemm(bits: int) -> None:
    w = torch.randn(64, 32).half()
    ref = OPS.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    assert torch.equal(qm.quantize_rows_chunked(w, bits), ref)
    assert torch.equal(qm.to_fbgemm_rows(*qm.rowwise_quantize(w, bits), bits), ref)


def test_rowwise_constant_row_rule() -> None:
    # range == 0 -> scale 1.0; every code 0; value == fp16(min) exactly.
    w = torch.full((3, 8), 0.25)
    q, scale, bias = qm.rowwise_quantize(w, 4)
    assert torch.all(q == 0)
    assert torch.all(scale == 1.0)
    assert torch.all(bias == 0.25)
    assert torch.equal(qm.fake_quantize_rowwise(w, 4), w)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_can_pack_row_matches_fbgemm_op(bits: int) -> None:
    for dim in range(1, 41):
        try:
            OPS.FloatToFusedNBitRowwiseQuantizedSBHalf(torch.randn(2, dim), bits)
            accepted = True
        except RuntimeError:
            accepted = False
        assert qm.can_pack(dim, bits, "row") == accepted, dim


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -7.0e4])
def test_rowwise_rejects_values_fp16_cannot_hold(value: float) -> None:
    w = torch.randn(4, 16)
    w[2, 3] = value
    with pytest.raises(ValueError, match="fp16"):
        qm.rowwise_quantize(w, 4)
    with pytest.raises(ValueError, match="fp16"):
        qm.quantize_rows_chunked(w, 4)


def test_rowwise_is_per_row_so_gathered_rows_fake_quantize_the_same() -> None:
    w = torch.randn(100, 16)
    idx = torch.tensor([5, 17, 17, 99, 0])
    assert torch.equal(qm.fake_quantize_rowwise(w[idx], 4), qm.fake_quantize_rowwise(w, 4)[idx])


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def test_pack_low_bits_first() -> None:
    q4 = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert qm.pack_nbit(q4, 4).tolist() == [[0x21, 0x43]]
    q2 = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    assert qm.pack_nbit(q2, 2).tolist() == [[0b00111001, 0xFF]]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for dim in (8, 16, 24, 128):
        q = torch.randint(0, 1 << bits, (33, dim), generator=g, dtype=torch.uint8)
        packed = qm.pack_nbit(q, bits)
        assert packed.shape == (33, dim * bits // 8)
        assert torch.equal(qm.unpack_nbit(packed, bits, dim), q)
        s = torch.randn(33).half()
        b = torch.randn(33).half()
        q2, s2, b2 = qm.from_fbgemm_rows(qm.to_fbgemm_rows(q, s, b, bits), bits, dim)
        assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(b2, b)
        inf_rows = qm.to_fbgemm_inference_rows(q, s, b, bits)
        assert inf_rows.shape[1] == qm.inference_row_bytes(dim, bits)
        q3, s3, b3 = qm.from_fbgemm_inference_rows(inf_rows, bits, dim)
        assert torch.equal(q3, q) and torch.equal(s3, s) and torch.equal(b3, b)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        qm.pack_nbit(torch.tensor([[16, 0]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        qm.pack_nbit(torch.zeros(2, 3, dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        qm.rowwise_quantize(torch.randn(2, 8), 3)


# ------------------------------------------------------------------------------------------------
# Chunked quantize+pack
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_chunked_equals_unchunked(bits: int) -> None:
    w = torch.randn(1000, 32)
    whole = qm.to_fbgemm_rows(*qm.rowwise_quantize(w, bits), bits)
    out = torch.full((1000, qm.rowwise_bytes(1, 32, bits)), 7, dtype=torch.uint8)
    for chunk in (1, 7, 256, 1000, 65536):
        out.fill_(7)
        res = qm.quantize_rows_chunked(w, bits, out=out, chunk_rows=chunk)
        assert res.data_ptr() == out.data_ptr()
        assert torch.equal(out, whole), chunk
    # non-contiguous input
    wt = torch.randn(32, 1000).t()
    assert torch.equal(
        qm.quantize_rows_chunked(wt, bits, chunk_rows=300),
        OPS.FloatToFusedNBitRowwiseQuantizedSBHalf(wt.contiguous(), bits),
    )


def test_chunked_rejects_wrong_out() -> None:
    with pytest.raises(ValueError, match="out"):
        qm.quantize_rows_chunked(torch.randn(10, 16), 4, out=torch.empty(10, 11, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------
# FBGEMM's fp32-scale 8-bit format
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 3, 8, 16, 37, 64])
def test_fused8bit_matches_fbgemm(dim: int) -> None:
    for kind in ["normal", "constant", "repeated", "large", "tiny", "negative", "signed_zeros"]:
        w = _table(kind, ROWS, dim) + (3.0 if kind == "normal" else 0.0)
        ref = OPS.FloatToFused8BitRowwiseQuantized(w)
        assert torch.equal(qm.fused8bit_quantize(w), ref), kind
        # FBGEMM dequantizes with an FMA: a plain q*s+b differs in the last bit often.
        assert torch.equal(qm.fused8bit_dequantize(ref), OPS.Fused8BitRowwiseQuantizedToFloat(ref))


# ------------------------------------------------------------------------------------------------
# Table-wise symmetric (DQRM)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_table_scale_is_smallest_fp16_not_below_needed(bits: int) -> None:
    qmax = (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(bits)
    for mag in (1e-7, 1e-3, 0.05, 1.0, 37.0, 1e3):
        w = torch.randn(50, 16, generator=g) * mag
        s = qm.table_scale(w, bits)
        need = float(w.abs().max()) / qmax
        assert float(np.float16(s)) == s
        assert s >= need
        below = np.nextafter(np.float16(s), np.float16(0))
        assert float(below) < need or s == 2.0**-24
        q, s2 = qm.tablewise_quantize(w, bits)
        assert s2 == s and q.dtype == torch.int8
        assert int(q.abs().max()) <= qmax  # rounding up never clips


def test_table_scale_edge_cases() -> None:
    assert qm.table_scale(torch.zeros(4, 8), 4) == 1.0
    assert qm.table_scale(torch.full((2, 2), 1e-12), 4) == 2.0**-24
    with pytest.raises(ValueError):
        qm.table_scale(torch.tensor([[float("nan")]]), 4)
    with pytest.raises(ValueError):
        qm.table_scale(torch.tensor([[1e6]]), 4)


@pytest.mark.parametrize("bits,dim", [(8, 16), (8, 6), (4, 16), (4, 12), (2, 16), (2, 24)])
def test_tablewise_to_fbgemm_rows_dequantizes_exactly(bits: int, dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    for mag in (1e-6, 0.01, 1.0, 300.0):
        w = torch.randn(200, dim, generator=g) * mag
        q, s = qm.tablewise_quantize(w, bits)
        expected = qm.tablewise_dequantize(q, s)
        assert torch.equal(qm.fake_quantize_tablewise(w, s, bits), expected)
        codes, s16, b16 = qm.tablewise_to_rowwise(q, s, bits)
        rows = qm.to_fbgemm_rows(codes, s16, b16, bits)
        got = OPS.FusedNBitRowwiseQuantizedSBHalfToFloat(rows, bits)
        assert torch.equal(got, expected), mag
        assert torch.equal(qm.rowwise_dequantize(codes, s16, b16), expected)


def test_tablewise_stale_scale_clips() -> None:
    w = torch.tensor([[-10.0, -1.0, 0.4, 10.0]])
    q, s = qm.tablewise_quantize(w, 4, scale=1.0)
    assert q.tolist() == [[-8, -1, 0, 7]] and s == 1.0


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_tablewise_to_rowwise_rejects_scales_fp16_cannot_hold(bits: int) -> None:
    q = torch.zeros(2, 8, dtype=torch.int8)
    too_big = 2.0 ** math.floor(math.log2(qm.FP16_MAX / (1 << (bits - 1)))) * 2
    for bad in (0.1, too_big, 0.0, -1.0, float("inf")):
        assert not qm.tablewise_scale_fits_fbgemm(bad, bits)
        with pytest.raises(ValueError, match="fp16"):
            qm.tablewise_to_rowwise(q, bad, bits)
    ok = too_big / 2
    assert qm.tablewise_scale_fits_fbgemm(ok, bits)
    qm.tablewise_to_rowwise(q, ok, bits)


# ------------------------------------------------------------------------------------------------
# Per-output-channel (MLP)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_channel_quantize_error_bound(bits: int) -> None:
    w = torch.randn(64, 48) * torch.logspace(-3, 2, 64).unsqueeze(1)
    w[5] = 0.0
    q, s = qm.channel_quantize(w, bits)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert s[5] == 1.0 and torch.all(q[5] == 0)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert int(q.min()) >= lo and int(q.max()) <= hi
    err = (w - qm.channel_dequantize(q, s)).abs()
    assert torch.all(err <= s.unsqueeze(1) / 2 * (1 + 2.0**-20))
    assert torch.equal(qm.fake_quantize_channel(w, bits), qm.channel_dequantize(q, s))


# ------------------------------------------------------------------------------------------------
# Straight-through estimator
# ------------------------------------------------------------------------------------------------


def test_ste_forward_is_fake_quant_and_gradient_is_identity() -> None:
    w0 = torch.randn(16, 16)
    cases = [
        (qm.ste_fake_quantize_rowwise, (4,), qm.fake_quantize_rowwise(w0, 4)),
        (qm.ste_fake_quantize_tablewise, (0.125, 4), qm.fake_quantize_tablewise(w0, 0.125, 4)),
        (qm.ste_fake_quantize_channel, (2,), qm.fake_quantize_channel(w0, 2)),
    ]
    for fn, args, expected in cases:
        w = w0.clone().requires_grad_(True)
        y = fn(w, *args)
        assert torch.equal(y.detach(), expected)
        g = torch.randn(16, 16)
        y.backward(g)
        assert torch.equal(w.grad, g)
    w = w0.clone().requires_grad_(True)
    qm.ste_fake_quantize(qm.fake_quantize_rowwise, w, 2).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w0))


# ------------------------------------------------------------------------------------------------
# TorchRec's quantized EmbeddingBagCollection layout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,bits", [(torch.quint4x2, 4), (torch.quint2x4, 2), (torch.qint8, 8)])
def test_inference_rows_match_torchrec_quantized_ebc(dtype: torch.dtype, bits: int) -> None:
    from torch.ao.quantization import PlaceholderObserver
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    from torchrec.quant.embedding_modules import QuantConfig

    torch.manual_seed(0)
    dims = {"t0": 8, "t1": 16, "t2": 64}
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=11, feature_names=[f"f{n}"])
            for n, d in dims.items()
        ],
        device=torch.device("cpu"),
    )
    ebc.qconfig = QuantConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float),
        weight=PlaceholderObserver.with_args(dtype=dtype),
    )
    qebc = QuantEBC.from_float(ebc)
    sd = qebc.state_dict()
    for name, dim in dims.items():
        stored = sd[f"embedding_bags.{name}.weight"]
        stored = getattr(stored, "elem", stored)  # UInt4Tensor / UInt2Tensor wrap raw bytes
        w = ebc.embedding_bags[name].weight.detach()
        ours = qm.to_fbgemm_inference_rows(*qm.rowwise_quantize(w, bits), bits)
        assert stored.dtype == torch.uint8
        assert stored.shape == (11, qm.inference_row_bytes(dim, bits))
        assert torch.equal(stored, ours), name


# ------------------------------------------------------------------------------------------------
# Byte accounting
# ------------------------------------------------------------------------------------------------


def test_byte_accounting() -> None:
    kaggle_rows = 33_762_577
    assert qm.rowwise_bytes(kaggle_rows, 16, 4) == kaggle_rows * 12  # about 405 MB
    assert qm.rowwise_bytes(10, 16, 8) == 10 * 20
    assert qm.rowwise_bytes(10, 16, 2) == 10 * 8
    assert qm.tablewise_bytes(kaggle_rows, 16, 4) == kaggle_rows * 8 + 4
    assert qm.tablewise_bytes(3, 3, 2) == math.ceil(18 / 8) + 4
    assert qm.inference_row_bytes(16, 4) == 16
    assert qm.inference_row_bytes(16, 8) == 32
    assert qm.inference_row_bytes(128, 4) == 80
    assert qm.can_pack(16, 4, "row") and not qm.can_pack(6, 4, "row")
    assert qm.can_pack(6, 4, "table") and qm.can_pack(5, 2, "channel")
    with pytest.raises(ValueError):
        qm.can_pack(16, 4, "block")


def test_deterministic() -> None:
    w = torch.randn(300, 16)
    a = qm.quantize_rows_chunked(w, 4)
    b = qm.quantize_rows_chunked(w, 4, chunk_rows=17)
    assert torch.equal(a, b)
    assert torch.equal(qm.fake_quantize_rowwise(w, 2), qm.fake_quantize_rowwise(w, 2))
