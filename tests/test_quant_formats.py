"""Tests of compress.quant (packing, FBGEMM row-wise, DQRM table-wise, per-channel, fake quant):
bit-exact against FBGEMM's CPU ops, TorchRec's quantized EBC and DQRM's table-wise formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

fbgemm_gpu = pytest.importorskip("fbgemm_gpu")

from quant_reference import (  # noqa: E402
    fake_quantize_tablewise,
    fbgemm_fake_quantize_rowwise,
    fbgemm_rows,
    fused_rows,
    split_fused_rows,
    tablewise_codes,
)

from compress.quant import fake_quant, packing  # noqa: E402
from compress.quant.fbgemm_rowwise import (  # noqa: E402
    FP16_MAX,
    inference_row_bytes,
    rowwise_bytes,
    rowwise_dequantize,
    rowwise_quantize_packed,
    to_fbgemm_inference_rows,
)
from compress.quant.packing import can_pack, pack_nbit, unpack_nbit  # noqa: E402
from compress.quant.per_channel import (  # noqa: E402
    channel_dequantize,
    channel_quantize,
    channel_weight_bytes,
    fake_quantize_channel,
    ste_fake_quantize_channel,
)
from compress.quant.tablewise import (  # noqa: E402
    signed_offset,
    table_scale,
    tablewise_bytes,
    tablewise_dequantize,
    tablewise_quantize_packed,
    tablewise_scale_fits_fbgemm,
    tablewise_to_rowwise,
)

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

        packed, scale, bias = rowwise_quantize_packed(w, bits)
        assert torch.equal(fused_rows(packed, scale, bias), ref), kind
        chunked = rowwise_quantize_packed(w, bits, chunk=50)  # 192 rows: an uneven last chunk
        assert torch.equal(fused_rows(*chunked), ref), kind

        p2, s2, b2 = split_fused_rows(ref)
        deq = rowwise_dequantize(unpack_nbit(p2, bits, dim), s2, b2)
        assert torch.equal(deq, ref_deq), kind
        assert torch.equal(fake_quant.fake_quantize_rowwise_(w.clone(), bits), ref_deq), kind


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rowwise_half_input_matches_fbgemm(bits: int, dtype: torch.dtype) -> None:
    w = torch.randn(64, 32).to(dtype)
    ref = fbgemm_rows(w if dtype == torch.float16 else w.float(), bits)  # bf16 -> fp32 is exact
    assert torch.equal(fused_rows(*rowwise_quantize_packed(w, bits, chunk=24)), ref)


def test_rowwise_constant_row_rule() -> None:
    # range == 0 -> scale 1.0; every code 0; value == fp16(min) exactly.
    w = torch.full((3, 8), 0.25)
    packed, scale, bias = rowwise_quantize_packed(w, 4)
    assert torch.all(packed == 0)
    assert torch.all(scale == 1.0)
    assert torch.all(bias == 0.25)
    assert torch.equal(fake_quant.fake_quantize_rowwise_(w.clone(), 4), w)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_can_pack_row_matches_fbgemm_op(bits: int) -> None:
    for dim in range(1, 41):
        try:
            OPS.FloatToFusedNBitRowwiseQuantizedSBHalf(torch.randn(2, dim), bits)
            accepted = True
        except RuntimeError:
            accepted = False
        assert can_pack(dim, bits, "row") == accepted, dim


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -7.0e4])
def test_rowwise_rejects_values_fp16_cannot_hold(value: float) -> None:
    w = torch.randn(40, 16)
    w[33, 3] = value  # in the last chunk
    with pytest.raises(ValueError, match="fp16"):
        rowwise_quantize_packed(w, 4)
    with pytest.raises(ValueError, match="fp16"):
        rowwise_quantize_packed(w, 4, chunk=16)


def test_rowwise_is_per_row_so_gathered_rows_fake_quantize_the_same() -> None:
    w = torch.randn(100, 16)
    idx = torch.tensor([5, 17, 17, 99, 0])
    whole = fake_quant.fake_quantize_rowwise_(w.clone(), 4)
    assert torch.equal(fake_quant.fake_quantize_rowwise_(w[idx], 4), whole[idx])


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def test_pack_low_bits_first() -> None:
    q4 = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert pack_nbit(q4, 4).tolist() == [[0x21, 0x43]]
    q2 = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    assert pack_nbit(q2, 2).tolist() == [[0b00111001, 0xFF]]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for dim in (8, 16, 24, 128):
        q = torch.randint(0, 1 << bits, (33, dim), generator=g, dtype=torch.uint8)
        packed = pack_nbit(q, bits)
        assert packed.shape == (33, dim * bits // 8)
        assert torch.equal(unpack_nbit(packed, bits, dim), q)
        # the chunked quantizers' float packer writes the same bytes
        out = torch.empty_like(packed)
        acc = torch.empty(packed.shape, dtype=torch.float32) if bits < 8 else None
        packing.pack_float_codes_into(q.float(), bits, out, acc)
        assert torch.equal(out, packed)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pack_nbit(torch.tensor([[16, 0]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        pack_nbit(torch.zeros(2, 3, dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        rowwise_quantize_packed(torch.randn(2, 8), 3)
    with pytest.raises(ValueError, match="whole bytes"):
        rowwise_quantize_packed(torch.randn(2, 5), 4)
    with pytest.raises(ValueError, match="whole bytes"):
        tablewise_quantize_packed(torch.randn(2, 5), 4)


# ------------------------------------------------------------------------------------------------
# Chunked conversion
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_every_chunk_size_gives_fbgemms_bytes(bits: int) -> None:
    w = torch.randn(1000, 32)
    ref = OPS.FloatToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    q_ref, s_ref = tablewise_codes(w, bits)
    codes_ref = pack_nbit((q_ref.to(torch.int16) + signed_offset(bits)).to(torch.uint8), bits)
    for chunk in (1, 7, 256, 300, 999, 1000, 65536):  # 300: last chunk of 100 rows
        assert torch.equal(fused_rows(*rowwise_quantize_packed(w, bits, chunk=chunk)), ref), chunk
        packed, s = tablewise_quantize_packed(w, bits, chunk=chunk)
        assert s == s_ref and torch.equal(packed, codes_ref), chunk
    # a non-contiguous and an fp16 table go through the float32 scratch chunk by chunk
    wt = torch.randn(32, 1000).t()
    assert torch.equal(
        fused_rows(*rowwise_quantize_packed(wt, bits, chunk=300)),
        OPS.FloatToFusedNBitRowwiseQuantizedSBHalf(wt.contiguous(), bits),
    )
    q_t, s_t = tablewise_codes(wt, bits)
    packed, s = tablewise_quantize_packed(wt, bits, chunk=300)
    assert s == s_t
    assert torch.equal(unpack_nbit(packed, bits, 32).to(torch.int16) - signed_offset(bits), q_t)


def test_default_chunk_holds_a_bounded_number_of_floats() -> None:
    assert packing.chunk_rows(16) == 65536  # 4 MiB of float32 scratch
    assert packing.chunk_rows(128) == packing.CHUNK_ELEMENTS // 128
    assert packing.chunk_rows(packing.CHUNK_ELEMENTS * 2) == 1


def test_chunk_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk"):
        rowwise_quantize_packed(torch.randn(10, 16), 4, chunk=0)
    with pytest.raises(ValueError, match="chunk"):
        tablewise_quantize_packed(torch.randn(10, 16), 4, chunk=-1)


def test_empty_tables_convert_to_empty_arrays() -> None:
    packed, scale, bias = rowwise_quantize_packed(torch.empty(0, 16), 4)
    assert packed.shape == (0, 8) and scale.shape == (0,) and bias.shape == (0,)
    packed, s = tablewise_quantize_packed(torch.empty(0, 16), 4)
    assert packed.shape == (0, 8) and s == 1.0


# ------------------------------------------------------------------------------------------------
# Table-wise symmetric (DQRM)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_table_scale_is_smallest_fp16_not_below_needed(bits: int) -> None:
    qmax = (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(bits)
    for mag in (1e-7, 1e-3, 0.05, 1.0, 37.0, 1e3):
        w = torch.randn(50, 16, generator=g) * mag
        s = table_scale(w, bits)
        need = float(w.abs().max()) / qmax
        assert float(np.float16(s)) == s
        assert s >= need
        below = np.nextafter(np.float16(s), np.float16(0))
        assert float(below) < need or s == 2.0**-24
        packed, s2 = tablewise_quantize_packed(w, bits)
        assert s2 == s
        q = unpack_nbit(packed, bits, 16).to(torch.int16) - signed_offset(bits)
        assert int(q.abs().max()) <= qmax  # rounding up never clips


def test_table_scale_edge_cases() -> None:
    assert table_scale(torch.zeros(4, 8), 4) == 1.0
    assert table_scale(torch.full((2, 2), 1e-12), 4) == 2.0**-24
    with pytest.raises(ValueError):
        table_scale(torch.tensor([[float("nan")]]), 4)
    with pytest.raises(ValueError):
        table_scale(torch.tensor([[1e6]]), 4)


@pytest.mark.parametrize("bits,dim", [(8, 16), (8, 6), (4, 16), (4, 12), (2, 16), (2, 24)])
def test_tablewise_to_fbgemm_rows_dequantizes_exactly(bits: int, dim: int) -> None:
    g = torch.Generator().manual_seed(dim)
    for mag in (1e-6, 0.01, 1.0, 300.0):
        w = torch.randn(200, dim, generator=g) * mag
        q, s = tablewise_codes(w, bits)
        packed, s2 = tablewise_quantize_packed(w, bits, chunk=64)  # 200 rows: last chunk of 8
        assert s2 == s
        stored = unpack_nbit(packed, bits, dim).to(torch.int16) - signed_offset(bits)
        assert torch.equal(stored, q.to(torch.int16)), mag
        expected = tablewise_dequantize(q, s)
        assert torch.equal(fake_quantize_tablewise(w, s, bits), expected)
        assert torch.equal(fake_quant.fake_quantize_tablewise_(w.clone(), s, bits), expected)
        codes, s16, b16 = tablewise_to_rowwise(q, s, bits)
        rows = fused_rows(pack_nbit(codes, bits), s16, b16)
        got = OPS.FusedNBitRowwiseQuantizedSBHalfToFloat(rows, bits)
        assert torch.equal(got, expected), mag
        assert torch.equal(rowwise_dequantize(codes, s16, b16), expected)


def test_tablewise_stale_scale_clips() -> None:
    w = torch.tensor([[-10.0, -1.0, 0.4, 10.0]])
    packed, s = tablewise_quantize_packed(w, 4, scale=1.0)
    q = unpack_nbit(packed, 4, 4).to(torch.int16) - signed_offset(4)
    assert q.tolist() == [[-8, -1, 0, 7]] and s == 1.0


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_tablewise_to_rowwise_rejects_scales_fp16_cannot_hold(bits: int) -> None:
    q = torch.zeros(2, 8, dtype=torch.int8)
    too_big = 2.0 ** math.floor(math.log2(FP16_MAX / (1 << (bits - 1)))) * 2
    for bad in (0.1, too_big, 0.0, -1.0, float("inf")):
        assert not tablewise_scale_fits_fbgemm(bad, bits)
        with pytest.raises(ValueError, match="fp16"):
            tablewise_to_rowwise(q, bad, bits)
    ok = too_big / 2
    assert tablewise_scale_fits_fbgemm(ok, bits)
    tablewise_to_rowwise(q, ok, bits)


# ------------------------------------------------------------------------------------------------
# Per-output-channel (MLP)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_channel_quantize_error_bound(bits: int) -> None:
    w = torch.randn(64, 48) * torch.logspace(-3, 2, 64).unsqueeze(1)
    w[5] = 0.0
    q, s = channel_quantize(w, bits)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert s[5] == 1.0 and torch.all(q[5] == 0)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert int(q.min()) >= lo and int(q.max()) <= hi
    err = (w - channel_dequantize(q, s)).abs()
    assert torch.all(err <= s.unsqueeze(1) / 2 * (1 + 2.0**-20))
    assert torch.equal(fake_quantize_channel(w, bits), channel_dequantize(q, s))


def test_channel_ste_forward_is_fake_quant_and_gradient_is_identity() -> None:
    w0 = torch.randn(16, 16)
    w = w0.clone().requires_grad_(True)
    y = ste_fake_quantize_channel(w, 2)
    assert torch.equal(y.detach(), fake_quantize_channel(w0, 2))
    g = torch.randn(16, 16)
    y.backward(g)
    assert torch.equal(w.grad, g)


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
        packed, scale, bias = rowwise_quantize_packed(w, bits)
        ours = to_fbgemm_inference_rows(unpack_nbit(packed, bits, dim), scale, bias, bits)
        assert stored.dtype == torch.uint8
        assert stored.shape == (11, inference_row_bytes(dim, bits))
        assert torch.equal(stored, ours), name


# ------------------------------------------------------------------------------------------------
# Byte accounting
# ------------------------------------------------------------------------------------------------


def test_byte_accounting() -> None:
    kaggle_rows = 33_762_577
    assert rowwise_bytes(kaggle_rows, 16, 4) == kaggle_rows * 12  # about 405 MB
    assert rowwise_bytes(10, 16, 8) == 10 * 20
    assert rowwise_bytes(10, 16, 2) == 10 * 8
    assert tablewise_bytes(kaggle_rows, 16, 4) == kaggle_rows * 8 + 4
    assert tablewise_bytes(3, 3, 2) == math.ceil(18 / 8) + 4
    assert channel_weight_bytes(3, 5, 4) == 3 * 3 + 12  # an odd row pads one nibble
    assert inference_row_bytes(16, 4) == 16
    assert inference_row_bytes(16, 8) == 32
    assert inference_row_bytes(128, 4) == 80
    assert can_pack(16, 4, "row") and not can_pack(6, 4, "row")
    assert can_pack(6, 4, "table") and can_pack(5, 2, "channel")
    with pytest.raises(ValueError):
        can_pack(16, 4, "block")


def test_deterministic() -> None:
    w = torch.randn(300, 16)
    a = rowwise_quantize_packed(w, 4)
    b = rowwise_quantize_packed(w, 4, chunk=17)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(
        fake_quant.fake_quantize_rowwise_(w.clone(), 2),
        fake_quant.fake_quantize_rowwise_(w.clone(), 2),
    )
    assert torch.equal(
        fbgemm_fake_quantize_rowwise(w, 2), fake_quant.fake_quantize_rowwise_(w.clone(), 2)
    )
