"""FBGEMM's fused n-bit row-wise format: quantize, dequantize, row layouts and bytes.

Row-wise asymmetric N-bit quantization (N in 8, 4, 2) that reproduces
``torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf`` (``FloatOrHalfToFusedNBitRowwise
QuantizedSBHalf`` in FBGEMM's ``QuantUtils.cc`` / ``QuantUtilsAvx2.cc``) byte for byte, and its
inverse ``FusedNBitRowwiseQuantizedSBHalfToFloat``. Per row, in float32 arithmetic::

    bias16  = fp16(min(x))                 # round to nearest even
    bias    = float(bias16)
    range   = max(x) - bias                # the float max, not rounded; may even be < 0
    scale   = 1.0 if range == 0 else range / (2^N - 1)
    scale   = float(fp16(scale))           # the stored scale is fp16
    scale   = 1.0 if scale == 0            # (range underflowed fp16)
    inv     = 1.0 / scale                  # float32 reciprocal, then a multiply, no division
    q       = clamp(rint((x - bias) * inv), 0, 2^N - 1)     # rint: ties to even
    value   = q * scale16 + bias16         # dequantization (FMA or not: q*scale is exact)

Codes are packed low bits first (:mod:`compress.quant.packing`). FBGEMM's fused row is
``[packed][fp16 scale][fp16 bias]``; the project stores the three parts as separate arrays. The
TBE inference kernel and TorchRec's quantized ``EmbeddingBagCollection`` keep
``[fp16 scale][fp16 bias][packed][zeros to 16 bytes]`` for INT8, INT4 and INT2 alike (TorchRec's
INT8 is this fp16 format with N=8): :func:`to_fbgemm_inference_rows`.

Conversion (:func:`rowwise_quantize_packed`) works chunk by chunk, so quantizing a big table holds
one chunk of float32 scratch besides its input and its packed output; each chunk takes one
compiled pass (:mod:`compress.quant.native`) where the kernels are available.

Example::

    >>> w = torch.randn(4, 16)
    >>> packed, scale, bias = rowwise_quantize_packed(w, 4)
    >>> deq = rowwise_dequantize(unpack_nbit(packed, 4), scale, bias)  # == FBGEMM's round trip
"""

from __future__ import annotations

import torch

from compress.quant.packing import (
    Chunks,
    check_bits,
    check_float_table,
    check_packable,
    pack_nbit,
    quantize_in_chunks,
)
from compress.quant.sizes import (  # defined there (no torch), re-exported here
    ROW_ALIGNMENT,
    SCALE_BIAS_BYTES,
    inference_row_bytes,
    rowwise_bytes,
)

__all__ = [
    "FP16_MAX",
    "ROW_ALIGNMENT",
    "SCALE_BIAS_BYTES",
    "inference_row_bytes",
    "rowwise_bytes",
    "rowwise_codes_float",
    "rowwise_dequantize",
    "rowwise_quantize_packed",
    "to_fbgemm_inference_rows",
]


FP16_MAX = 65504.0
"""Largest finite fp16 value."""

_AVX2_LANES = 8  # float32 lanes of FBGEMM's AVX2 min/max scan

_NOT_FINITE = (
    "row-wise quantization: a row's min or (max - min)/(2^bits - 1) is not finite in fp16 "
    f"(|values| must stay within about +-{FP16_MAX:g} and be finite); FBGEMM would store "
    "inf/NaN scale or bias"
)


def _fbgemm_zero_extremum(x: torch.Tensor) -> torch.Tensor:
    """The signed zero FBGEMM's AVX2 kernels report as the min of rows whose min is zero, i.e.
    rows mixing ``+0.0`` and ``-0.0`` at their min.

    The kernels keep 8 lanes, ``lane = minps(lane, x[block])`` over whole blocks of 8 columns
    (ties return the newer value), then fold lanes 0..7 with ``std::min`` (ties keep the earlier
    one), then fold the remaining ``D % 8`` columns with ``std::min`` (ties keep). So the zero of
    the first lane that has one, taken from that lane's last block, wins; otherwise the first
    zero of the tail. Only the sign of a stored zero depends on it (an fp16 bias of ``0x0000`` vs
    ``0x8000``); values dequantize the same. (FBGEMM's scalar fallback on CPUs without AVX2 takes
    ``std::min_element``'s first minimum instead.)

    Args:
        x: ``[k, D]`` rows whose min equals zero.

    Returns:
        ``[k]`` float32 of ``+0.0`` / ``-0.0``.
    """
    k, dim = x.shape
    zero = x == 0
    neg = torch.signbit(x)
    sign = torch.zeros(k, dtype=torch.bool)
    decided = torch.zeros(k, dtype=torch.bool)
    full = dim // _AVX2_LANES * _AVX2_LANES
    if full:
        nblk = full // _AVX2_LANES
        zb = zero[:, :full].reshape(k, nblk, _AVX2_LANES)
        nbk = neg[:, :full].reshape(k, nblk, _AVX2_LANES)
        order = torch.arange(1, nblk + 1).view(1, nblk, 1)
        last_blk = (zb.long() * order).argmax(dim=1, keepdim=True)  # [k, 1, 8]
        lane_sign = nbk.gather(1, last_blk).squeeze(1)  # [k, 8]
        lane_has = zb.any(dim=1)  # [k, 8]
        first_lane = (lane_has.long() * torch.arange(_AVX2_LANES, 0, -1)).argmax(dim=1)
        decided = lane_has.any(dim=1)
        sign = lane_sign.gather(1, first_lane.unsqueeze(1)).squeeze(1) & decided
    if full < dim:
        zt = zero[:, full:]
        first_tail = (zt.long() * torch.arange(dim - full, 0, -1)).argmax(dim=1)
        tail_sign = neg[:, full:].gather(1, first_tail.unsqueeze(1)).squeeze(1)
        sign = torch.where(decided, sign, tail_sign)
    return torch.where(sign, -0.0, 0.0).to(torch.float32)


def _fbgemm_aminmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row min and max ``[R]`` of ``[R, D]`` float32 as FBGEMM's AVX2 scan returns them (a zero
    min gets FBGEMM's sign; the max is never stored, so its sign does not matter).

    A row whose min is zero holds no negative value, so its min is ``-0.0`` when every zero in it
    is ``-0.0``, ``+0.0`` when none is; only rows holding both (rare) need the lane rule of
    :func:`_fbgemm_zero_extremum`. All-zero rows (never-seen ids) thus cost two cheap passes."""
    mn, mx = x.amin(dim=1), x.amax(dim=1)  # two passes beat torch.aminmax on narrow rows
    rows = (mn == 0).nonzero().squeeze(1)
    if rows.numel():
        zeros = x.index_select(0, rows)
        negative = torch.signbit(zeros)  # in rows of min 0, exactly the -0.0 entries
        has_negative = negative.any(dim=1)
        mixed = has_negative & ~negative.logical_or_(zeros != 0).all(dim=1)
        mn[rows] = torch.where(has_negative, -0.0, 0.0)
        if bool(mixed.any()):
            mn[rows[mixed]] = _fbgemm_zero_extremum(zeros[mixed])
    return mn, mx


def _rowwise_params_from_minmax(
    mn: torch.Tensor, mx: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FBGEMM's per-row parameters from float32 row minima and maxima ``[R]``.

    Returns ``(scale16, bias16, bias32, inv32)``, all ``[R]``: ``scale16``/``bias16`` are what the
    row stores, ``bias32 = float(bias16)`` and ``inv32 = 1 / float(scale16)`` (float32) are what
    quantization uses. Raises ``ValueError`` when a row's scale or bias is not a finite fp16
    number (FBGEMM would store inf/NaN).
    """
    bias16 = mn.to(torch.float16)
    bias = bias16.to(torch.float32)
    rng = mx - bias
    scale = torch.where(rng == 0, torch.ones_like(rng), rng / float((1 << bits) - 1))
    scale = scale.to(torch.float16).to(torch.float32)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    inv = torch.reciprocal(scale)
    # FBGEMM resets scale and inverse to 1 when 1/scale overflows; with an fp16 scale (>= 2^-24)
    # this cannot happen, kept for fidelity.
    bad_inv = torch.isinf(inv)
    if bool(bad_inv.any()):
        scale = torch.where(bad_inv, torch.ones_like(scale), scale)
        inv = torch.where(bad_inv, torch.ones_like(inv), inv)
    scale16 = scale.to(torch.float16)
    if not bool(torch.isfinite(scale16.float().add_(bias)).all()):  # one check for both
        raise ValueError(_NOT_FINITE)
    return scale16, bias16, bias, inv


def rowwise_codes_float(
    x: torch.Tensor, bias: torch.Tensor, inv: torch.Tensor, bits: int, out: torch.Tensor | None
) -> torch.Tensor:
    """``clamp(rint((x - bias) * inv), 0, 2^bits - 1)`` as float32 ``[R, D]`` (into ``out``),
    with ``bias``/``inv`` ``[R]`` float32 (FBGEMM's ``bias32`` and ``1/scale``)."""
    out = torch.sub(x, bias.unsqueeze(1), out=out)
    out.mul_(inv.unsqueeze(1))
    out.round_()  # round half to even, as lrintf / cvtps2dq
    return out.clamp_(0.0, float((1 << bits) - 1))


def rowwise_quantize_packed(
    w: torch.Tensor, bits: int, chunk: int | None = None, *, chunks: Chunks | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a table row-wise (FBGEMM's rule, see the module docstring) into packed codes and
    per-row fp16 scale and bias, one chunk of rows at a time.

    Concatenated per row, ``[packed][scale bytes][bias bytes]`` is byte for byte
    ``torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, bits)`` (fp16/bf16 inputs convert
    exactly, as ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`` does). Each chunk is quantized in
    one compiled pass where the kernels of :mod:`compress.quant.native` are available, else in
    PyTorch; the bytes are the same. Memory: the outputs plus one chunk of float32 scratch; a
    float32 contiguous ``w`` is read in place, never copied.

    Args:
        w: ``[R, D]`` float tensor; ``D`` a positive multiple of ``8 // bits``.
        bits: 8, 4 or 2.
        chunk: rows per chunk; default :func:`compress.quant.packing.chunk_rows` of ``D``.
        chunks: where the rows come from (default: views of ``w``,
            :func:`compress.quant.packing.quantize_in_chunks`).

    Returns:
        ``(packed [R, D*bits/8] uint8, scale [R] float16, bias [R] float16)``.

    Raises:
        ValueError: bad shape, dtype or bits, or a row whose scale or bias is not a finite fp16
            value (FBGEMM would store inf/NaN).
    """
    from compress.quant import native  # (native imports fake_quant, which imports this module)

    rows, _ = check_float_table(w, bits)
    scale = torch.empty(rows, dtype=torch.float16)
    bias = torch.empty(rows, dtype=torch.float16)

    def compiled(x: torch.Tensor, out: torch.Tensor, chunk_rows: slice) -> bool:
        bad = native.rowwise_quantize_into(x, bits, out, scale[chunk_rows], bias[chunk_rows])
        if bad is not None and bad >= 0:
            raise ValueError(_NOT_FINITE)
        return bad is not None

    def codes(x: torch.Tensor, work: torch.Tensor, chunk_rows: slice) -> torch.Tensor:
        mn, mx = _fbgemm_aminmax(x)
        scale16, bias16, bias32, inv = _rowwise_params_from_minmax(mn, mx, bits)
        scale[chunk_rows] = scale16
        bias[chunk_rows] = bias16
        return rowwise_codes_float(x, bias32, inv, bits, work)

    packed = quantize_in_chunks(w, bits, chunk, codes, compiled=compiled, chunks=chunks)
    return packed, scale, bias


def rowwise_dequantize(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``q * scale + bias`` per row, in float32, equal to FBGEMM's dequantization.

    ``q * scale`` is exact in float32 (an fp16 mantissa times an 8-bit integer), so one rounding
    happens, in the add, which is what FBGEMM's FMA computes too.

    Args:
        q: ``[R, D]`` integer codes (uint8, unpacked).
        scale: ``[R]`` float16 (or float32 holding fp16 values).
        bias: ``[R]`` float16 (or float32 holding fp16 values).

    Returns:
        ``[R, D]`` float32.
    """
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [rows, dim], got shape {tuple(q.shape)}")
    s = scale.to(torch.float32).reshape(-1, 1)
    b = bias.to(torch.float32).reshape(-1, 1)
    if s.shape[0] != q.shape[0] or b.shape[0] != q.shape[0]:
        raise ValueError(f"scale/bias have {s.shape[0]}/{b.shape[0]} rows, q has {q.shape[0]} rows")
    out = q.to(torch.float32)
    out.mul_(s)
    return out.add_(b)


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[R]`` float16 as its little-endian bytes ``[R, 2]`` uint8."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def to_fbgemm_inference_rows(
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    bits: int,
    row_alignment: int = ROW_ALIGNMENT,
) -> torch.Tensor:
    """Rows of FBGEMM's inference TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``).

    Layout ``[fp16 scale][fp16 bias][packed codes][zeros up to row_alignment]``: what TorchRec's
    quantized ``EmbeddingBagCollection`` stores as ``embedding_bags.<table>.weight`` (inside a
    ``UInt4Tensor``/``UInt2Tensor`` wrapper at INT4/INT2, a plain uint8 tensor at INT8), for
    ``torch.qint8`` (fp16 scale/bias too), ``torch.quint4x2`` and ``torch.quint2x4``.

    Args:
        q: ``[R, D]`` uint8 codes; ``D`` a multiple of ``8 // bits``.
        scale: ``[R]`` float16 (float32 is rounded to fp16).
        bias: ``[R]`` float16 (float32 is rounded to fp16).
        bits: 8, 4 or 2.
        row_alignment: TorchRec's default is 16.

    Returns:
        ``[R, inference_row_bytes(D, bits, row_alignment)]`` uint8.
    """
    bits = check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [rows, dim], got shape {tuple(q.shape)}")
    if scale.numel() != q.shape[0] or bias.numel() != q.shape[0]:
        raise ValueError(
            f"scale/bias have {scale.numel()}/{bias.numel()} values, q has {q.shape[0]} rows"
        )
    check_packable(q.shape[1], bits)
    nb = q.shape[1] * bits // 8
    out = torch.zeros(
        q.shape[0], inference_row_bytes(q.shape[1], bits, row_alignment), dtype=torch.uint8
    )
    out[:, 0:2] = _fp16_bytes(scale.reshape(-1))
    out[:, 2:4] = _fp16_bytes(bias.reshape(-1))
    out[:, SCALE_BIAS_BYTES : SCALE_BIAS_BYTES + nb] = pack_nbit(q, bits)
    return out
