"""Symmetric per-output-channel quantization of MLP weights, and its straight-through fake quant.

Per output channel ``o`` of a weight ``w [out, in, ...]``: scale ``s[o] = max|w[o]| / (2^(b-1) - 1)``
(float32, not rounded to fp16; 1.0 for an all-zero channel), codes
``q = clamp(rint(w / s[o]), -2^(b-1), 2^(b-1) - 1)`` (ties to even), value ``q * s[o]``: the
scheme of ``torch.quantize_per_channel`` (qint8, zero points 0) with these scales, computed with a
true division ``w / s[o]``. QAT
fake-quantizes the weights in the forward with an identity (straight-through) gradient, as DQRM
does (arXiv 2410.20046); convert stores the int8 codes (INT4/INT2 packed by the exporter) and
the scales.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.quant.packing import check_bits
from compress.quant.tablewise import symmetric_range

__all__ = [
    "channel_dequantize",
    "channel_quantize",
    "channel_scales",
    "channel_weight_bytes",
    "fake_quantize_channel",
    "ste_fake_quantize_channel",
]


def channel_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scales ``max|w[o]| / (2^(b-1) - 1)`` as float32 ``[out]``.

    An all-zero channel gets scale ``1.0`` (its codes are all 0 whatever the scale; 1.0 keeps
    the division and any later export well defined). Scales are not rounded to fp16.

    Args:
        w: ``[out, in, ...]`` float tensor (dims after the first are reduced).
        bits: 8, 4 or 2.
    """
    bits = check_bits(bits)
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
    bits = check_bits(bits)
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


class _StraightThrough(torch.autograd.Function):
    """Forward :func:`fake_quantize_channel`; backward passes the gradient to ``w`` unchanged."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, bits: int) -> torch.Tensor:
        return fake_quantize_channel(w, bits).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def ste_fake_quantize_channel(w: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`fake_quantize_channel` with an identity gradient (DQRM's straight-through
    estimator, unmasked). ``w``: ``[out, in, ...]``.

    The forward value is exactly ``fake_quantize_channel(w, bits)`` (no ``w + (fq - w).detach()``
    rounding); the gradient with respect to ``w`` is the incoming gradient.
    """
    return _StraightThrough.apply(w, bits)


def channel_weight_bytes(out_features: int, in_features: int, bits: int) -> int:
    """Bytes of a per-channel quantized weight: each output row packed to whole bytes (an odd
    ``in_features`` at INT4 pads one nibble per row) plus one fp32 scale per output channel."""
    return out_features * ((in_features * bits + 7) // 8) + 4 * out_features
