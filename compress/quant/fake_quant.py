"""In-place fake quantizers of the QAT hot path, in PyTorch: the reference of the compiled kernels.

A QAT lookup gathers the rows a batch touches and overwrites them with their quantize-dequantize
values (DQRM technique 1, arXiv 2410.20046). :mod:`compress.quant.native` runs that in compiled C
kernels and falls back to these functions where the kernels cannot be built; both give the same
values, and the values equal what convert stores:

* :func:`fake_quantize_rowwise_`: FBGEMM's row-wise n-bit round trip
  (``FloatToFusedNBitRowwiseQuantizedSBHalf`` then ``FusedNBitRowwiseQuantizedSBHalfToFloat``),
  :mod:`compress.quant.fbgemm_rowwise`.
* :func:`fake_quantize_tablewise_`: DQRM's symmetric table-wise rule at a given scale,
  :mod:`compress.quant.tablewise`.

No input checks: the callers pass float32 ``[R, D]`` rows with finite values and a positive finite
scale from :func:`compress.quant.tablewise.table_scale`.
"""

from __future__ import annotations

import torch

from compress.quant.fbgemm_rowwise import rowwise_codes_float
from compress.quant.tablewise import symmetric_range

__all__ = ["fake_quantize_rowwise_", "fake_quantize_tablewise_"]


def fake_quantize_rowwise_(w: torch.Tensor, bits: int) -> torch.Tensor:
    """FBGEMM's row-wise quantize-dequantize round trip of float32 ``w`` ``[R, D]``, in place.

    The same values as FBGEMM for finite inputs, in few passes and no row-sized temporaries (no
    sign-of-zero bookkeeping, which changes a stored bias byte but never a dequantized value).
    A row's result depends on that row alone, so fake-quantizing the gathered rows equals
    gathering from the fake-quantized table.

    FBGEMM's rule, step by step: ``bias = fp16(min)``, ``scale = fp16((max - bias) / (2^b - 1))``
    (1 when that is 0), ``q = clamp(rint((x - bias) * (1 / scale)), 0, 2^b - 1)``,
    value ``q * scale + bias``. ``w`` is overwritten and returned.
    """
    lo, hi = torch.aminmax(w, dim=1, keepdim=True)
    bias = lo.half().float()
    scale = hi.sub_(bias).div_(float((1 << bits) - 1)).half().float()
    scale.masked_fill_(scale == 0, 1.0)
    inv = torch.reciprocal(scale)
    rowwise_codes_float(w, bias.squeeze(1), inv.squeeze(1), bits, w)
    return w.mul_(scale).add_(bias)


def fake_quantize_tablewise_(w: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """DQRM's table-wise quantize-dequantize at ``scale``, in place: float32 ``w`` is overwritten
    with ``clamp(rint(w / s), -2^(b-1), 2^(b-1) - 1) * s`` and returned."""
    lo, hi = symmetric_range(bits)
    return w.div_(scale).round_().clamp_(lo, hi).mul_(scale)
