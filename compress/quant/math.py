"""Quantization math of dqrm-compress: pure, deterministic functions on torch tensors.

Nothing here imports the rest of the project. Fake-quant modules, the QAT loop, the converters and
the exporters are all built on these functions, so that what a model is trained against is,
bit for bit, what gets stored.

Three schemes:

* **Row-wise asymmetric N-bit** (N in 8, 4, 2), FBGEMM's fused format. Reproduces
  ``torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf`` (``FloatOrHalfToFusedNBitRowwise
  QuantizedSBHalf`` in FBGEMM's ``QuantUtils.cc`` / ``QuantUtilsAvx2.cc``) exactly. Per row, in
  float32 arithmetic::

      bias16  = fp16(min(x))                 # round to nearest even
      bias    = float(bias16)
      range   = max(x) - bias                # the float max, not rounded; may even be < 0
      scale   = 1.0 if range == 0 else range / (2^N - 1)
      scale   = float(fp16(scale))           # the stored scale is fp16
      scale   = 1.0 if scale == 0            # (range underflowed fp16)
      inv     = 1.0 / scale                  # float32 reciprocal, then a multiply, no division
      q       = clamp(rint((x - bias) * inv), 0, 2^N - 1)     # rint: ties to even
      value   = q * scale16 + bias16         # dequantization (FMA or not: q*scale is exact)

  Packing is low bits first (element ``2j`` in the low nibble at INT4, element ``4j`` in bits 0-1
  at INT2). FBGEMM row: ``[packed][fp16 scale][fp16 bias]``; the TBE inference kernel and TorchRec's
  quantized ``EmbeddingBagCollection`` keep ``[fp16 scale][fp16 bias][packed][zeros to 16 bytes]``
  for INT8, INT4 and INT2 alike (TorchRec's INT8 is this fp16 format with N=8, not the fp32 one).
* **Table-wise symmetric** (DQRM): one scale per table, ``q = clamp(rint(W/s), -2^(b-1),
  2^(b-1)-1)``, value ``q*s``. ``s`` is rounded *up* to an fp16 value so that a table converts
  exactly into FBGEMM rows (codes ``q + 2^(b-1)``, scale ``s``, bias ``-2^(b-1)*s``).
* **Per-output-channel symmetric** for MLP weights, float32 scales.

Also the other FBGEMM 8-bit format (``FloatToFused8BitRowwiseQuantized``: ``[uint8 codes][fp32
scale][fp32 bias]``), straight-through-estimator wrappers, and byte accounting for the planner.

Example::

    >>> w = torch.randn(4, 16)
    >>> rows = quantize_rows_chunked(w, 4)  # == FloatToFusedNBitRowwiseQuantizedSBHalf(w, 4)
    >>> q, scale, bias = from_fbgemm_rows(rows, 4, 16)
    >>> torch.equal(rowwise_dequantize(q, scale, bias), fake_quantize_rowwise(w, 4))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = [
    "FP16_MAX",
    "ROW_ALIGNMENT",
    "SCALE_BIAS_BYTES",
    "SUPPORTED_BITS",
    "can_pack",
    "channel_dequantize",
    "channel_quantize",
    "channel_scales",
    "fake_quantize_channel",
    "fake_quantize_rowwise",
    "fake_quantize_rowwise_",
    "fake_quantize_tablewise",
    "fake_quantize_tablewise_",
    "from_fbgemm_inference_rows",
    "from_fbgemm_rows",
    "fused8bit_dequantize",
    "fused8bit_quantize",
    "inference_row_bytes",
    "pack_nbit",
    "packed_row_bytes",
    "quantize_rows_chunked",
    "rowwise_bytes",
    "rowwise_dequantize",
    "rowwise_qparams",
    "rowwise_quantize",
    "ste_fake_quantize",
    "ste_fake_quantize_channel",
    "ste_fake_quantize_rowwise",
    "ste_fake_quantize_tablewise",
    "scale_from_absmax",
    "signed_offset",
    "symmetric_range",
    "table_scale",
    "tablewise_bytes",
    "tablewise_dequantize",
    "tablewise_quantize",
    "tablewise_scale_fits_fbgemm",
    "tablewise_to_rowwise",
    "to_fbgemm_inference_rows",
    "to_fbgemm_rows",
    "unpack_nbit",
]

SUPPORTED_BITS = (8, 4, 2)
"""Bit widths of the row-wise, table-wise and per-channel quantizers."""

SCALE_BIAS_BYTES = 4
"""Bytes of the per-row ``fp16 scale`` + ``fp16 bias`` pair in FBGEMM's N-bit rows."""

ROW_ALIGNMENT = 16
"""Row alignment (bytes) of FBGEMM's inference TBE, TorchRec's ``DEFAULT_ROW_ALIGNMENT``."""

FP16_MAX = 65504.0
"""Largest finite fp16 value."""

_FP16_MIN_POSITIVE = 2.0**-24  # smallest positive (subnormal) fp16
_FUSED8_EPS = 1e-8  # kEpsilon of FBGEMM's FloatToFused8BitRowwiseQuantized


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def _as_float_matrix(w: torch.Tensor, name: str = "w") -> torch.Tensor:
    """``w`` as a 2-D float32 tensor (fp16/bf16 convert exactly; other dtypes are rejected)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {w.dtype}")
    if w.shape[1] == 0:
        raise ValueError(f"{name} has dim 0: nothing to quantize")
    return w.detach().to(torch.float32)


def _elems_per_byte(bits: int) -> int:
    return 8 // bits


def packed_row_bytes(dim: int, bits: int) -> int:
    """Bytes of ``dim`` packed ``bits``-bit codes: ``ceil(dim * bits / 8)``."""
    _check_bits(bits)
    return (dim * bits + 7) // 8


def _check_packable(dim: int, bits: int) -> None:
    if dim <= 0 or dim % _elems_per_byte(bits) != 0:
        raise ValueError(
            f"dim {dim} cannot be packed at {bits} bits: it must be a positive multiple of "
            f"{_elems_per_byte(bits)} (whole bytes per row)"
        )


# --------------------------------------------------------------------------------------------------
# Row-wise asymmetric N-bit (FBGEMM fused SBHalf format)
# --------------------------------------------------------------------------------------------------


_AVX2_LANES = 8  # float32 lanes of FBGEMM's AVX2 min/max scan


def _fbgemm_zero_extremum(x: torch.Tensor) -> torch.Tensor:
    """The signed zero FBGEMM's AVX2 kernels report as the min (or max) of rows whose extremum
    is zero, i.e. rows mixing ``+0.0`` and ``-0.0`` at their min (max).

    The kernels keep 8 lanes, ``lane = minps(lane, x[block])`` over whole blocks of 8 columns
    (ties return the newer value), then fold lanes 0..7 with ``std::min`` (ties keep the earlier
    one), then fold the remaining ``D % 8`` columns with ``std::min`` (ties keep). So the zero of
    the first lane that has one, taken from that lane's last block, wins; otherwise the first
    zero of the tail. The same rule holds for the max. Only the sign of a stored zero depends
    on it (an fp16 bias of ``0x0000`` vs ``0x8000``); values dequantize the same. (FBGEMM's scalar
    fallback on CPUs without AVX2 takes ``std::min_element``'s first minimum instead.)

    Args:
        x: ``[k, D]`` rows whose min (or max) equals zero.

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


def _fbgemm_aminmax(x: torch.Tensor, signed_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Row min and max ``[R]`` of ``[R, D]`` float32 as FBGEMM's AVX2 scan returns them.

    A zero min always gets FBGEMM's sign; a zero max only with ``signed_max`` (the N-bit format
    never stores the max, the fp32 8-bit format stores ``max - min``).
    """
    mn, mx = x.amin(dim=1), x.amax(dim=1)  # two passes beat torch.aminmax on narrow rows
    for ext in (mn, mx) if signed_max else (mn,):
        rows = (ext == 0).nonzero().squeeze(1)
        if rows.numel():
            ext[rows] = _fbgemm_zero_extremum(x[rows])
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
    if not (bool(torch.isfinite(scale16).all()) and bool(torch.isfinite(bias16).all())):
        raise ValueError(
            "row-wise quantization: a row's min or (max - min)/(2^bits - 1) is not finite in fp16 "
            f"(|values| must stay within about +-{FP16_MAX:g} and be finite); FBGEMM would store "
            "inf/NaN scale or bias"
        )
    return scale16, bias16, bias, inv


def rowwise_qparams(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FBGEMM's per-row fp16 ``(scale, bias)`` of a table.

    Args:
        w: ``[R, D]`` float tensor (float32; fp16/bf16 are converted exactly).
        bits: 8, 4 or 2.

    Returns:
        ``(scale, bias)``: two ``[R]`` float16 tensors, bit-identical to the last four bytes of
        ``torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, bits)``.
    """
    bits = _check_bits(bits)
    x = _as_float_matrix(w)
    if x.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.float16)
        return empty, empty.clone()
    mn, mx = _fbgemm_aminmax(x)
    scale16, bias16, _, _ = _rowwise_params_from_minmax(mn, mx, bits)
    return scale16, bias16


def _rowwise_codes_float(
    x: torch.Tensor, bias: torch.Tensor, inv: torch.Tensor, bits: int, out: torch.Tensor | None
) -> torch.Tensor:
    """``clamp(rint((x - bias) * inv), 0, 2^bits - 1)`` as float32 ``[R, D]`` (into ``out``)."""
    out = torch.sub(x, bias.unsqueeze(1), out=out)
    out.mul_(inv.unsqueeze(1))
    out.round_()  # round half to even, as lrintf / cvtps2dq
    return out.clamp_(0.0, float((1 << bits) - 1))


def rowwise_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise asymmetric quantization, FBGEMM semantics (see the module docstring).

    Args:
        w: ``[R, D]`` float tensor.
        bits: 8, 4 or 2.

    Returns:
        ``(q, scale, bias)``: ``q`` uint8 codes ``[R, D]`` in ``[0, 2^bits - 1]`` (unpacked),
        ``scale`` and ``bias`` float16 ``[R]``.
    """
    bits = _check_bits(bits)
    x = _as_float_matrix(w)
    if x.shape[0] == 0:
        e16 = torch.empty(0, dtype=torch.float16)
        return torch.empty(0, x.shape[1], dtype=torch.uint8), e16, e16.clone()
    mn, mx = _fbgemm_aminmax(x)
    scale16, bias16, bias, inv = _rowwise_params_from_minmax(mn, mx, bits)
    q = _rowwise_codes_float(x, bias, inv, bits, None).to(torch.uint8)
    return q, scale16, bias16


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


def fake_quantize_rowwise(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``rowwise_dequantize(*rowwise_quantize(w, bits))`` as float32 ``[R, D]``, in one pass.

    Bit-identical to FBGEMM's quantize-then-dequantize round trip. A row's result depends on that
    row alone, so fake-quantizing only the rows a batch gathers equals gathering from the
    fake-quantized table.
    """
    bits = _check_bits(bits)
    x = _as_float_matrix(w)
    if x.shape[0] == 0:
        return x.clone()
    mn, mx = _fbgemm_aminmax(x)
    scale16, _, bias, inv = _rowwise_params_from_minmax(mn, mx, bits)
    out = _rowwise_codes_float(x, bias, inv, bits, None)
    out.mul_(scale16.to(torch.float32).unsqueeze(1))
    return out.add_(bias.unsqueeze(1))


def fake_quantize_rowwise_(w: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`fake_quantize_rowwise` in place, for the QAT hot path: the same values for finite
    inputs, in fewer passes, no row-sized temporaries and no input checks (no inf/NaN test, no
    sign-of-zero bookkeeping, which changes stored bias bytes but never a dequantized value).

    FBGEMM's rule, step by step: ``bias = fp16(min)``, ``scale = fp16((max - bias) / (2^b - 1))``
    (1 when that is 0), ``q = clamp(rint((x - bias) * (1 / scale)), 0, 2^b - 1)``,
    value ``q * scale + bias``. ``w``: float32 ``[R, D]``, overwritten and returned.
    """
    lo, hi = torch.aminmax(w, dim=1, keepdim=True)
    bias = lo.half().float()
    scale = hi.sub_(bias).div_(float((1 << bits) - 1)).half().float()
    scale.masked_fill_(scale == 0, 1.0)
    inv = torch.reciprocal(scale)
    _rowwise_codes_float(w, bias.squeeze(1), inv.squeeze(1), bits, w)
    return w.mul_(scale).add_(bias)


# --------------------------------------------------------------------------------------------------
# Packing and FBGEMM row layouts
# --------------------------------------------------------------------------------------------------


def _pack_into(q: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack uint8 codes ``[R, D]`` into ``out`` ``[R, D*bits/8]`` (may be a strided view)."""
    if bits == 8:
        out.copy_(q)
        return
    per = _elems_per_byte(bits)
    g = q.reshape(q.shape[0], -1, per)
    acc = g[..., 0].clone()
    for k in range(1, per):
        acc.bitwise_or_(torch.bitwise_left_shift(g[..., k], k * bits))
    out.copy_(acc)


def pack_nbit(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-bit codes, low bits first, into bytes.

    INT4: byte ``j`` holds element ``2j`` in bits 0-3 and ``2j+1`` in bits 4-7. INT2: byte ``j``
    holds elements ``4j .. 4j+3`` in bits 0-1, 2-3, 4-5, 6-7. INT8: a copy.

    Args:
        q: ``[R, D]`` integer codes in ``[0, 2^bits - 1]``; ``D`` a multiple of ``8 // bits``.
        bits: 8, 4 or 2.

    Returns:
        ``[R, D * bits / 8]`` uint8.
    """
    bits = _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [rows, dim], got shape {tuple(q.shape)}")
    _check_packable(q.shape[1], bits)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack at {bits} bits")
    q8 = q.to(torch.uint8)
    out = torch.empty(q.shape[0], q.shape[1] * bits // 8, dtype=torch.uint8)
    _pack_into(q8, bits, out)
    return out


def unpack_nbit(packed: torch.Tensor, bits: int, dim: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_nbit`.

    Args:
        packed: ``[R, B]`` uint8.
        bits: 8, 4 or 2.
        dim: number of codes per row; defaults to ``B * 8 / bits`` and must equal it.

    Returns:
        ``[R, dim]`` uint8 codes.
    """
    bits = _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    per = _elems_per_byte(bits)
    full = packed.shape[1] * per
    if dim is None:
        dim = full
    if dim != full:
        raise ValueError(f"{packed.shape[1]} bytes hold {full} codes at {bits} bits, not {dim}")
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    parts = [torch.bitwise_right_shift(packed, k * bits).bitwise_and_(mask) for k in range(per)]
    return torch.stack(parts, dim=2).reshape(packed.shape[0], dim)


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[R]`` float16 as its little-endian bytes ``[R, 2]`` uint8."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """``[R, 2]`` uint8 (little-endian) as ``[R]`` float16."""
    return b.contiguous().view(torch.float16).reshape(-1)


def _check_row_args(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int) -> None:
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [rows, dim], got shape {tuple(q.shape)}")
    if scale.numel() != q.shape[0] or bias.numel() != q.shape[0]:
        raise ValueError(
            f"scale/bias have {scale.numel()}/{bias.numel()} values, q has {q.shape[0]} rows"
        )
    _check_packable(q.shape[1], bits)


def to_fbgemm_rows(
    q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int
) -> torch.Tensor:
    """FBGEMM fused rows ``[packed][fp16 scale][fp16 bias]``.

    The layout of ``torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf`` and the input of
    ``FusedNBitRowwiseQuantizedSBHalfToFloat``.

    Args:
        q: ``[R, D]`` uint8 codes; ``D`` a multiple of ``8 // bits``.
        scale: ``[R]`` float16 (float32 is rounded to fp16).
        bias: ``[R]`` float16 (float32 is rounded to fp16).
        bits: 8, 4 or 2.

    Returns:
        ``[R, D*bits/8 + 4]`` uint8.
    """
    bits = _check_bits(bits)
    _check_row_args(q, scale, bias, bits)
    nb = q.shape[1] * bits // 8
    out = torch.empty(q.shape[0], nb + SCALE_BIAS_BYTES, dtype=torch.uint8)
    out[:, :nb] = pack_nbit(q, bits)
    out[:, nb : nb + 2] = _fp16_bytes(scale.reshape(-1))
    out[:, nb + 2 : nb + 4] = _fp16_bytes(bias.reshape(-1))
    return out


def from_fbgemm_rows(
    rows: torch.Tensor, bits: int, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split FBGEMM fused rows into ``(q [R, D] uint8, scale [R] fp16, bias [R] fp16)``.

    Args:
        rows: ``[R, D*bits/8 + 4]`` uint8.
        bits: 8, 4 or 2.
        dim: ``D``; defaults to what the row width implies.
    """
    bits = _check_bits(bits)
    if rows.dim() != 2 or rows.dtype != torch.uint8:
        raise ValueError(f"rows must be 2-D uint8, got {rows.dtype} {tuple(rows.shape)}")
    nb = rows.shape[1] - SCALE_BIAS_BYTES
    if nb <= 0:
        raise ValueError(f"rows of {rows.shape[1]} bytes hold no codes")
    if dim is not None and packed_row_bytes(dim, bits) != nb:
        raise ValueError(
            f"rows of {rows.shape[1]} bytes do not hold dim {dim} at {bits} bits "
            f"(expected {packed_row_bytes(dim, bits) + SCALE_BIAS_BYTES} bytes)"
        )
    q = unpack_nbit(rows[:, :nb].contiguous(), bits, dim)
    return q, _fp16_from_bytes(rows[:, nb : nb + 2]), _fp16_from_bytes(rows[:, nb + 2 : nb + 4])


def inference_row_bytes(dim: int, bits: int, row_alignment: int = ROW_ALIGNMENT) -> int:
    """Bytes per row of FBGEMM's inference TBE: ``round_up(4 + dim*bits/8, row_alignment)``."""
    unpadded = SCALE_BIAS_BYTES + packed_row_bytes(dim, bits)
    return -(-unpadded // row_alignment) * row_alignment


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
        q: ``[R, D]`` uint8 codes.
        scale: ``[R]`` float16.
        bias: ``[R]`` float16.
        bits: 8, 4 or 2.
        row_alignment: TorchRec's default is 16.

    Returns:
        ``[R, inference_row_bytes(D, bits, row_alignment)]`` uint8.
    """
    bits = _check_bits(bits)
    _check_row_args(q, scale, bias, bits)
    nb = q.shape[1] * bits // 8
    out = torch.zeros(
        q.shape[0], inference_row_bytes(q.shape[1], bits, row_alignment), dtype=torch.uint8
    )
    out[:, 0:2] = _fp16_bytes(scale.reshape(-1))
    out[:, 2:4] = _fp16_bytes(bias.reshape(-1))
    out[:, SCALE_BIAS_BYTES : SCALE_BIAS_BYTES + nb] = pack_nbit(q, bits)
    return out


def from_fbgemm_inference_rows(
    rows: torch.Tensor, bits: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_fbgemm_inference_rows`: ``(q [R, dim], scale [R], bias [R])``."""
    bits = _check_bits(bits)
    if rows.dim() != 2 or rows.dtype != torch.uint8:
        raise ValueError(f"rows must be 2-D uint8, got {rows.dtype} {tuple(rows.shape)}")
    nb = packed_row_bytes(dim, bits)
    if rows.shape[1] < SCALE_BIAS_BYTES + nb:
        raise ValueError(f"rows of {rows.shape[1]} bytes cannot hold dim {dim} at {bits} bits")
    q = unpack_nbit(rows[:, SCALE_BIAS_BYTES : SCALE_BIAS_BYTES + nb].contiguous(), bits, dim)
    return q, _fp16_from_bytes(rows[:, 0:2]), _fp16_from_bytes(rows[:, 2:4])


def quantize_rows_chunked(
    w: torch.Tensor,
    bits: int,
    out: torch.Tensor | None = None,
    chunk_rows: int = 65536,
) -> torch.Tensor:
    """Quantize and pack a large table straight into FBGEMM fused rows, chunk by chunk.

    Byte-identical to ``torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, bits)`` and to
    ``to_fbgemm_rows(*rowwise_quantize(w, bits), bits)``, with memory bounded by one chunk of
    float32 scratch. Pass a preallocated ``out`` to avoid page-faulting a fresh buffer.

    Args:
        w: ``[R, D]`` float tensor; ``D`` a multiple of ``8 // bits``.
        bits: 8, 4 or 2.
        out: optional ``[R, D*bits/8 + 4]`` contiguous uint8 buffer, written in place.
        chunk_rows: rows per chunk.

    Returns:
        ``out`` (or a new tensor): ``[R, D*bits/8 + 4]`` uint8.
    """
    bits = _check_bits(bits)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    rows, dim = w.shape
    _check_packable(dim, bits)
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    nb = dim * bits // 8
    width = nb + SCALE_BIAS_BYTES
    if out is None:
        out = torch.empty(rows, width, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or tuple(out.shape) != (rows, width) or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous uint8 tensor of shape {(rows, width)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    if rows == 0:
        return out
    w = w.detach()
    per = _elems_per_byte(bits)
    # float32 scratch reused across chunks; packing accumulates in float (exact small integers)
    # and converts once into the strided slice of `out`.
    n = min(chunk_rows, rows)
    work = torch.empty(n, dim, dtype=torch.float32)
    acc = torch.empty(n, nb, dtype=torch.float32) if per > 1 else None
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        m = stop - start
        x = w[start:stop]
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = work[:m].copy_(x)
        mn, mx = _fbgemm_aminmax(x)
        scale16, bias16, bias, inv = _rowwise_params_from_minmax(mn, mx, bits)
        codes = _rowwise_codes_float(x, bias, inv, bits, work[:m])
        dst = out[start:stop]
        if acc is None:
            dst[:, :nb].copy_(codes)
        else:
            g = codes.view(m, nb, per)
            a = acc[:m]
            torch.add(g[..., 0], g[..., 1], alpha=float(1 << bits), out=a)
            for k in range(2, per):
                a.add_(g[..., k], alpha=float(1 << (k * bits)))
            dst[:, :nb].copy_(a)
        dst[:, nb : nb + 2].copy_(_fp16_bytes(scale16))
        dst[:, nb + 2 : nb + 4].copy_(_fp16_bytes(bias16))
    return out


# --------------------------------------------------------------------------------------------------
# FBGEMM's other 8-bit format: [uint8 codes][fp32 scale][fp32 bias]
# --------------------------------------------------------------------------------------------------


def fused8bit_quantize(w: torch.Tensor) -> torch.Tensor:
    """``torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized``: rows ``[codes][fp32 s][fp32 b]``.

    Per row (float32): ``bias = min``, ``scale = range / 255``, ``inv = 255 / (range + 1e-8)``,
    ``q = clamp(rint((x - min) * inv), 0, 255)``. Not fp16, not the format TorchRec uses for INT8.

    Args:
        w: ``[R, D]`` float tensor (any ``D >= 1``).

    Returns:
        ``[R, D + 8]`` uint8.
    """
    x = _as_float_matrix(w)
    rows, dim = x.shape
    out = torch.empty(rows, dim + 8, dtype=torch.uint8)
    if rows == 0:
        return out
    mn, mx = _fbgemm_aminmax(x, signed_max=True)
    rng = mx - mn
    scale = rng / 255.0
    inv = torch.full_like(rng, 255.0) / (rng + _FUSED8_EPS)
    q = torch.sub(x, mn.unsqueeze(1)).mul_(inv.unsqueeze(1)).round_().clamp_(0.0, 255.0)
    out[:, :dim] = q.to(torch.uint8)
    out[:, dim : dim + 4] = scale.contiguous().view(torch.uint8).reshape(rows, 4)
    out[:, dim + 4 :] = mn.contiguous().view(torch.uint8).reshape(rows, 4)
    return out


def _fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``a*b + c`` (one rounding, like an FMA instruction).

    Valid when ``a*b`` is exact in float64 (here: an 8-bit integer times a float32). The float64
    sum is rounded to odd, which makes the final rounding to float32 correct (Boldo-Melquiond).
    """
    p = a.to(torch.float64) * b.to(torch.float64)
    c64 = c.to(torch.float64).expand_as(p)
    s = p + c64
    # TwoSum error term: s + err == p + c exactly.
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    bits64 = s.view(torch.int64)
    inexact_even = (err != 0) & ((bits64 & 1) == 0)
    toward_larger_mag = (err > 0) == (s > 0)
    step = torch.where(toward_larger_mag, 1, -1).to(torch.int64)
    bits64 = torch.where(inexact_even, bits64 + step, bits64)
    return bits64.view(torch.float64).to(torch.float32)


def fused8bit_dequantize(rows: torch.Tensor) -> torch.Tensor:
    """``torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat``: ``q * scale + bias`` (fused).

    FBGEMM's AVX2 kernel uses an FMA; this reproduces its single rounding exactly.

    Args:
        rows: ``[R, D + 8]`` uint8.

    Returns:
        ``[R, D]`` float32.
    """
    if rows.dim() != 2 or rows.dtype != torch.uint8 or rows.shape[1] <= 8:
        raise ValueError(f"rows must be 2-D uint8 with > 8 bytes, got {tuple(rows.shape)}")
    dim = rows.shape[1] - 8
    scale = rows[:, dim : dim + 4].contiguous().view(torch.float32)
    bias = rows[:, dim + 4 :].contiguous().view(torch.float32)
    return _fma_f32(rows[:, :dim], scale, bias)


# --------------------------------------------------------------------------------------------------
# Table-wise symmetric (DQRM)
# --------------------------------------------------------------------------------------------------


def signed_offset(bits: int) -> int:
    """``2^(bits-1)`` (8 at INT4, 128 at INT8): ``bits``-bit symmetric codes ``q`` lie in
    ``[-2^(bits-1), 2^(bits-1) - 1]`` and are stored unsigned as ``q + 2^(bits-1)`` (the zero point
    of the packed table-wise codes)."""
    return 1 << (bits - 1)


def symmetric_range(bits: int) -> tuple[int, int]:
    """The smallest and largest ``bits``-bit symmetric code: ``(-2^(bits-1), 2^(bits-1) - 1)``."""
    return -signed_offset(bits), signed_offset(bits) - 1


def _fp16_ceil(v: float) -> float:
    """Smallest fp16 value ``>= v`` (``v`` positive and at most ``FP16_MAX``)."""
    h = np.float16(v)  # round to nearest even, directly from float64
    if float(h) < v:
        h = np.nextafter(h, np.float16(np.inf))
    return float(h)


def table_scale(w: torch.Tensor, bits: int) -> float:
    """DQRM per-table scale ``max|W| / (2^(b-1) - 1)``, rounded UP to an fp16 value.

    Rounding up (never down) keeps ``max|W| / s <= 2^(b-1) - 1``: no value clips, and the scale is
    exactly representable in FBGEMM's fp16 rows. Scales below the smallest fp16 (``2^-24``) become
    ``2^-24``. An all-zero table gets scale ``1.0`` (every code is 0 whatever the scale).

    Args:
        w: a float tensor of any shape (the table, or the rows that set its scale).
        bits: 8, 4 or 2.

    Returns:
        The scale as a Python float (exactly an fp16 value).

    Raises:
        ValueError: the table holds inf/NaN, or the scale exceeds the fp16 range.
    """
    bits = _check_bits(bits)
    if w.numel() == 0:
        return 1.0
    lo, hi = torch.aminmax(w.detach())  # max|W| without a table-sized |W| temporary
    return scale_from_absmax(max(-float(lo), float(hi)), bits)


def scale_from_absmax(amax: float, bits: int) -> float:
    """:func:`table_scale` from a known ``max|W|`` (``amax``), with the same rounding and errors."""
    bits = _check_bits(bits)
    if not math.isfinite(amax):
        raise ValueError("table-wise scale: the table holds inf or NaN")
    if amax == 0.0:
        return 1.0
    s = amax / symmetric_range(bits)[1]
    if s > FP16_MAX:
        raise ValueError(
            f"table-wise scale {s:g} (max|W| = {amax:g}) exceeds fp16's largest value {FP16_MAX:g}"
        )
    return _fp16_ceil(s)


def tablewise_quantize(
    w: torch.Tensor, bits: int, scale: float | None = None
) -> tuple[torch.Tensor, float]:
    """Symmetric table-wise quantization ``q = clamp(rint(W / s), -2^(b-1), 2^(b-1) - 1)``.

    Args:
        w: float tensor of any shape.
        bits: 8, 4 or 2.
        scale: the table's scale (e.g. a periodically refreshed one); defaults to
            :func:`table_scale`. A stale scale may clip, which is what training saw.

    Returns:
        ``(q, scale)``: int8 codes shaped like ``w``, and the scale used.
    """
    q, scale = _tablewise_codes(w, bits, scale)
    return q.to(torch.int8), scale


def _tablewise_codes(w: torch.Tensor, bits: int, scale: float | None) -> tuple[torch.Tensor, float]:
    """Float32 codes ``clamp(rint(w / s), -2^(b-1), 2^(b-1) - 1)`` and the scale ``s`` used."""
    bits = _check_bits(bits)
    if scale is None:
        scale = table_scale(w, bits)
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"table-wise scale must be positive and finite, got {scale!r}")
    lo, hi = symmetric_range(bits)
    return torch.div(w.detach().to(torch.float32), scale).round_().clamp_(lo, hi), scale


def tablewise_dequantize(q: torch.Tensor, scale: float) -> torch.Tensor:
    """``q * s`` in float32, shaped like ``q`` (exact when ``s`` is an fp16 value)."""
    return q.to(torch.float32) * float(scale)


def fake_quantize_tablewise(w: torch.Tensor, scale: float | None, bits: int) -> torch.Tensor:
    """``tablewise_dequantize(*tablewise_quantize(w, bits, scale))`` in float32.

    ``scale=None`` computes :func:`table_scale` of ``w`` itself. For QAT that quantizes only the
    gathered rows, pass the table's (periodically refreshed) scale.
    """
    codes, scale = _tablewise_codes(w, bits, scale)
    return codes.mul_(scale)


def fake_quantize_tablewise_(w: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """:func:`fake_quantize_tablewise` in place, for the QAT hot path: float32 ``w`` is overwritten
    with ``clamp(rint(w / s), -2^(b-1), 2^(b-1) - 1) * s`` and returned (no checks: ``scale`` is a
    positive finite value from :func:`table_scale`)."""
    lo, hi = symmetric_range(bits)
    return w.div_(scale).round_().clamp_(lo, hi).mul_(scale)


def tablewise_scale_fits_fbgemm(scale: float, bits: int) -> bool:
    """Whether a table-wise scale converts exactly to FBGEMM rows.

    Needs ``s`` to be a positive fp16 value and ``2^(b-1) * s <= 65504`` (the bias ``-2^(b-1)*s``
    must be a finite fp16 number; it is then exact, a power-of-two multiple of ``s``).
    """
    bits = _check_bits(bits)
    s = float(scale)
    if not (math.isfinite(s) and s >= _FP16_MIN_POSITIVE):
        return False
    if float(np.float16(s)) != s:
        return False
    return signed_offset(bits) * s <= FP16_MAX


def tablewise_to_rowwise(
    q: torch.Tensor, scale: float, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-express table-wise codes as FBGEMM row-wise ``(codes, scale, bias)``, exactly.

    ``codes = q + 2^(b-1)`` (uint8 in ``[0, 2^b - 1]``), ``scale = s``, ``bias = -2^(b-1) * s``
    per row (fp16). FBGEMM's dequantization ``codes*s + bias`` then equals ``q*s`` bit for bit:
    ``codes*s`` is exact and the exact result ``q*s`` is a float32 value. Works for 8 bits too:
    FBGEMM's N-bit format (and TorchRec's INT8) accepts ``bits=8``.

    Args:
        q: ``[R, D]`` int8 table-wise codes.
        scale: the table's scale ``s``.
        bits: 8, 4 or 2.

    Returns:
        ``(codes [R, D] uint8, scale [R] float16, bias [R] float16)``.

    Raises:
        ValueError: ``s`` is not an fp16 value, or ``2^(b-1)*s`` overflows fp16.
    """
    bits = _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [rows, dim], got shape {tuple(q.shape)}")
    if not tablewise_scale_fits_fbgemm(scale, bits):
        raise ValueError(
            f"table-wise scale {float(scale)!r} cannot become FBGEMM rows at {bits} bits: it must "
            f"be an fp16 value in [2^-24, {FP16_MAX / signed_offset(bits):g}] so that the bias "
            f"-{signed_offset(bits)}*s is a finite fp16 number (use table_scale())"
        )
    lo, hi = symmetric_range(bits)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"table-wise codes must lie in [{lo}, {hi}] at {bits} bits")
    codes = (q.to(torch.int16) + signed_offset(bits)).to(torch.uint8)
    rows = q.shape[0]
    s16 = torch.full((rows,), float(scale), dtype=torch.float16)
    b16 = torch.full((rows,), -float(signed_offset(bits)) * float(scale), dtype=torch.float16)
    return codes, s16, b16


# --------------------------------------------------------------------------------------------------
# Per-output-channel symmetric (MLP weights)
# --------------------------------------------------------------------------------------------------


def channel_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scales ``max|w[o]| / (2^(b-1) - 1)`` as float32 ``[out]``.

    An all-zero channel gets scale ``1.0`` (its codes are all 0 whatever the scale; 1.0 keeps
    the division and any later export well defined). Scales are not rounded to fp16.

    Args:
        w: ``[out, in, ...]`` float tensor (dims after the first are reduced).
        bits: 8, 4 or 2.
    """
    bits = _check_bits(bits)
    if w.dim() < 1:
        raise ValueError("w must have an output-channel dimension")
    x = w.detach().to(torch.float32)
    amax = x.reshape(x.shape[0], -1).abs().amax(dim=1)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("per-channel scale: the weight holds inf or NaN")
    s = amax / float(symmetric_range(bits)[1])
    return torch.where(amax == 0, torch.ones_like(s), s)


def _channel_view(scales: torch.Tensor, ndim: int) -> torch.Tensor:
    return scales.to(torch.float32).reshape((-1,) + (1,) * (ndim - 1))


def channel_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization.

    Args:
        w: ``[out, in, ...]`` float tensor.
        bits: 8, 4 or 2.

    Returns:
        ``(q, scales)``: int8 codes shaped like ``w`` in ``[-2^(b-1), 2^(b-1) - 1]`` and float32
        scales ``[out]``. ``|w - q*s| <= s/2`` elementwise (up to float rounding).
    """
    bits = _check_bits(bits)
    scales = channel_scales(w, bits)
    lo, hi = symmetric_range(bits)
    x = w.detach().to(torch.float32)
    q = torch.div(x, _channel_view(scales, x.dim())).round_().clamp_(lo, hi)
    return q.to(torch.int8), scales


def channel_dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``q * scales[o]`` in float32, shaped like ``q``."""
    return q.to(torch.float32) * _channel_view(scales, q.dim())


def fake_quantize_channel(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``channel_dequantize(*channel_quantize(w, bits))`` in float32."""
    q, scales = channel_quantize(w, bits)
    return channel_dequantize(q, scales)


# --------------------------------------------------------------------------------------------------
# Straight-through estimator
# --------------------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Forward ``fn(w, *args)``; backward passes the gradient to ``w`` unchanged."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., torch.Tensor], w: torch.Tensor, *args: Any):
        ctx.num_args = len(args)
        return fn(w, *args).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return (None, grad) + (None,) * ctx.num_args


def ste_fake_quantize(fn: Callable[..., torch.Tensor], w: torch.Tensor, *args: Any) -> torch.Tensor:
    """Apply a fake quantizer with a straight-through (identity) gradient.

    The forward value is exactly ``fn(w, *args)`` (no ``w + (fq - w).detach()`` rounding), the
    gradient with respect to ``w`` is the incoming gradient, unmasked (DQRM's STE).

    Example::

        >>> w = torch.randn(8, 16, requires_grad=True)
        >>> ste_fake_quantize(fake_quantize_rowwise, w, 4).sum().backward()  # w.grad == 1
    """
    return _StraightThrough.apply(fn, w, *args)


def ste_fake_quantize_rowwise(w: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`fake_quantize_rowwise` with an identity gradient. ``w``: ``[R, D]``."""
    return ste_fake_quantize(fake_quantize_rowwise, w, bits)


def ste_fake_quantize_tablewise(w: torch.Tensor, scale: float | None, bits: int) -> torch.Tensor:
    """:func:`fake_quantize_tablewise` with an identity gradient."""
    return ste_fake_quantize(fake_quantize_tablewise, w, scale, bits)


def ste_fake_quantize_channel(w: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`fake_quantize_channel` with an identity gradient. ``w``: ``[out, in, ...]``."""
    return ste_fake_quantize(fake_quantize_channel, w, bits)


# --------------------------------------------------------------------------------------------------
# Byte accounting
# --------------------------------------------------------------------------------------------------


def rowwise_bytes(rows: int, dim: int, bits: int) -> int:
    """Bytes of a table in FBGEMM fused rows: ``rows * (ceil(dim*bits/8) + 4)``.

    (The inference TBE pads each row further to 16 bytes: see :func:`inference_row_bytes`.)
    """
    return rows * (packed_row_bytes(dim, bits) + SCALE_BIAS_BYTES)


def tablewise_bytes(rows: int, dim: int, bits: int) -> int:
    """Bytes of a table-wise table: ``ceil(rows*dim*bits/8)`` packed codes + one 4-byte scale.

    The scale is counted as fp32 (4 bytes); its value is fp16-exact.
    """
    _check_bits(bits)
    return (rows * dim * bits + 7) // 8 + 4


def channel_weight_bytes(out_features: int, in_features: int, bits: int) -> int:
    """Bytes of a per-channel quantized weight: each output row packed to whole bytes (an odd
    ``in_features`` at INT4 pads one nibble per row) plus one fp32 scale per output channel."""
    return out_features * ((in_features * bits + 7) // 8) + 4 * out_features


_GRANULARITIES = ("row", "table", "channel")


def can_pack(dim: int, bits: int, granularity: str) -> bool:
    """Whether a ``dim``-wide table/weight can be stored at ``bits`` with ``granularity``.

    * ``"row"`` (FBGEMM rows): FBGEMM's quantize op requires ``dim*bits/8`` to be a whole, even
      number of bytes (``ncols % (2 * 8/bits) == 0``): ``dim`` a multiple of 2 at INT8, 4 at INT4,
      8 at INT2. (The inference TBE alone needs only whole bytes, ``dim % (8/bits) == 0``.)
    * ``"table"``: codes are one packed stream, any ``dim >= 1``. Converting a table-wise table to
      FBGEMM rows later additionally needs ``can_pack(dim, bits, "row")``.
    * ``"channel"``: int8 codes per element, any ``dim >= 1``.
    """
    bits = _check_bits(bits)
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
    if dim <= 0:
        return False
    if granularity == "row":
        return dim % (2 * _elems_per_byte(bits)) == 0
    return True
