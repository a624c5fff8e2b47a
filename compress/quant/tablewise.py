"""DQRM's symmetric table-wise quantization: one scale per table, and its exact FBGEMM rows.

The rule of DQRM (Deep Quantized Recommendation Models, arXiv 2410.20046): a table ``W`` has one
scale ``s = max|W| / (2^(b-1) - 1)`` and codes ``q = clamp(rint(W / s), -2^(b-1), 2^(b-1) - 1)``
(ties to even), value ``q * s``. During QAT the scale is refreshed from ``max|W|`` every few
steps, and codes beyond a stale scale clip.

Here ``s`` is rounded *up* to an fp16 value (:func:`table_scale`), so that no value clips at a
fresh scale and the table converts exactly into FBGEMM's fused n-bit rows
(:func:`tablewise_to_rowwise`: codes ``q + 2^(b-1)``, scale ``s``, bias ``-2^(b-1) * s``), which
FBGEMM dequantizes to ``q * s`` bit for bit. Stored codes are unsigned, ``q + 2^(b-1)``
(:func:`signed_offset`), packed low bits first (:mod:`compress.quant.packing`).

Conversion (:func:`tablewise_quantize_packed`) works chunk by chunk, so quantizing a big table
holds one chunk of float32 scratch besides its input and its packed output; the scale can be read
chunk by chunk too (:func:`chunks_absmax`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from compress.quant.fbgemm_rowwise import FP16_MAX
from compress.quant.packing import Chunks, check_bits, check_float_table, quantize_in_chunks
from compress.quant.sizes import (  # defined there (no torch), re-exported here
    signed_offset,
    symmetric_range,
    tablewise_bytes,
)

__all__ = [
    "absmax",
    "chunks_absmax",
    "scale_from_absmax",
    "signed_offset",
    "symmetric_range",
    "table_scale",
    "tablewise_bytes",
    "tablewise_dequantize",
    "tablewise_quantize_packed",
    "tablewise_scale_fits_fbgemm",
    "tablewise_to_rowwise",
]

_FP16_MIN_POSITIVE = 2.0**-24  # smallest positive (subnormal) fp16


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
    bits = check_bits(bits)
    if w.numel() == 0:
        return 1.0
    return scale_from_absmax(absmax(w.detach()), bits)


def absmax(w: torch.Tensor) -> float:
    """``max|W|`` of a float tensor (``inf``/``nan`` when it holds one), without a ``|W|``
    temporary: one compiled pass over contiguous float32 (:mod:`compress.quant.native`), else
    ``torch.aminmax``."""
    from compress.quant import native  # (native imports fake_quant, which imports this module)

    if w.numel() == 0:
        return 0.0
    compiled = native.absmax(w)
    if compiled is not None:
        return compiled
    lo, hi = torch.aminmax(w)
    lo, hi = float(lo), float(hi)
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def chunks_absmax(chunks: Chunks) -> float:
    """:func:`absmax` over every chunk of a table (``nan`` as soon as one holds a NaN)."""
    amax = 0.0
    for _, _, x in chunks:
        a = absmax(x)
        if math.isnan(a):
            return a
        amax = max(amax, a)
    return amax


def scale_from_absmax(amax: float, bits: int) -> float:
    """:func:`table_scale` from a known ``max|W|`` (``amax``), with the same rounding and errors."""
    bits = check_bits(bits)
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


def tablewise_quantize_packed(
    w: torch.Tensor,
    bits: int,
    scale: float | None = None,
    chunk: int | None = None,
    *,
    chunks: Chunks | None = None,
) -> tuple[torch.Tensor, float]:
    """Quantize a table with one symmetric scale into packed unsigned codes, one chunk of rows at
    a time: ``q + 2^(b-1)`` with ``q = clamp(rint(W / s), -2^(b-1), 2^(b-1) - 1)``.

    Each chunk takes one compiled pass where the kernels of :mod:`compress.quant.native` are
    available, else PyTorch ops; the bytes are the same. Memory: the packed output plus one chunk
    of float32 scratch (``max|W|`` is read without a copy either).

    Args:
        w: ``[R, D]`` float tensor; ``D`` a positive multiple of ``8 // bits``.
        bits: 8, 4 or 2.
        scale: the table's scale (e.g. the periodically refreshed one of QAT); defaults to
            :func:`table_scale`. A stale scale may clip, which is what training saw.
        chunk: rows per chunk; default :func:`compress.quant.packing.chunk_rows` of ``D``.
        chunks: where the rows come from (default: views of ``w``,
            :func:`compress.quant.packing.quantize_in_chunks`); give ``scale`` with them, or the
            scale is read from ``w`` itself.

    Returns:
        ``(packed [R, D*bits/8] uint8, scale)``.
    """
    from compress.quant import native  # (native imports fake_quant, which imports this module)

    check_float_table(w, bits)
    s = table_scale(w, bits) if scale is None else float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"table-wise scale must be positive and finite, got {s!r}")
    lo, hi = symmetric_range(bits)
    offset = signed_offset(bits)

    def compiled(x: torch.Tensor, out: torch.Tensor, _: slice) -> bool:
        return native.tablewise_quantize_into(x, s, bits, out)

    def codes(x: torch.Tensor, work: torch.Tensor, _: slice) -> torch.Tensor:
        return torch.div(x, s, out=work).round_().clamp_(lo, hi).add_(offset)

    packed = quantize_in_chunks(w, bits, chunk, codes, compiled=compiled, chunks=chunks)
    return packed, s


def tablewise_dequantize(q: torch.Tensor, scale: float) -> torch.Tensor:
    """``q * s`` in float32, shaped like the signed codes ``q`` (exact when ``s`` is an fp16
    value)."""
    return q.to(torch.float32) * float(scale)


def tablewise_scale_fits_fbgemm(scale: float, bits: int) -> bool:
    """Whether a table-wise scale converts exactly to FBGEMM rows.

    Needs ``s`` to be a positive fp16 value and ``2^(b-1) * s <= 65504`` (the bias ``-2^(b-1)*s``
    must be a finite fp16 number; it is then exact, a power-of-two multiple of ``s``).
    """
    bits = check_bits(bits)
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
    bits = check_bits(bits)
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
