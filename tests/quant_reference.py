"""References the quantization tests compare the product against, written apart from it.

- FBGEMM's own ops (``torch.ops.fbgemm``) for the row-wise n-bit format, and FBGEMM's fused row
  layout ``[packed][fp16 scale][fp16 bias]`` assembled from (or split into) the three arrays the
  project stores.
- DQRM's table-wise rule written out as its formula, ``clamp(rint(W / s), -2^(b-1), 2^(b-1)-1)``
  (arXiv 2410.20046), with the scale from :func:`compress.quant.tablewise.table_scale`.
"""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch

from compress.quant.tablewise import table_scale

OPS = torch.ops.fbgemm


def fbgemm_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)``: FBGEMM's fused rows ``[R, B+4]``."""
    return OPS.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, bits)


def fbgemm_fake_quantize_rowwise(w: torch.Tensor, bits: int) -> torch.Tensor:
    """FBGEMM's row-wise quantize-dequantize round trip of ``w`` (float32 ``[R, D]``)."""
    return OPS.FusedNBitRowwiseQuantizedSBHalfToFloat(fbgemm_rows(w, bits), bits)


def fused_rows(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """FBGEMM's fused rows ``[packed][fp16 scale][fp16 bias]`` (uint8) of the stored parts."""
    scale_bytes = scale.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)
    bias_bytes = bias.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)
    return torch.cat([packed, scale_bytes, bias_bytes], dim=1)


def split_fused_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fused_rows`: ``(packed [R, B] uint8, scale [R] fp16, bias [R] fp16)``."""
    nb = rows.shape[1] - 4
    scale = rows[:, nb : nb + 2].contiguous().view(torch.float16).reshape(-1)
    bias = rows[:, nb + 2 :].contiguous().view(torch.float16).reshape(-1)
    return rows[:, :nb].contiguous(), scale, bias


def tablewise_codes(
    w: torch.Tensor, bits: int, scale: float | None = None
) -> tuple[torch.Tensor, float]:
    """DQRM's signed codes ``clamp(rint(w / s), -2^(b-1), 2^(b-1) - 1)`` (int8) and the scale ``s``
    (default :func:`~compress.quant.tablewise.table_scale` of ``w``)."""
    s = table_scale(w, bits) if scale is None else float(scale)
    half = 2 ** (bits - 1)
    q = torch.clamp(torch.round(w.detach().float() / s), -half, half - 1)
    return q.to(torch.int8), s


def fake_quantize_tablewise(w: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """DQRM's table-wise quantize-dequantize ``q * s`` at ``scale`` (float32)."""
    q, s = tablewise_codes(w, bits, scale)
    return q.float() * s
