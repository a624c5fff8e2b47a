"""A shared ROBE-Z array at its stored precision: quantize, dequantize, fake-quantize.

- ``"fp32"``: the array as it is.
- ``"fp16"``: the array cast to float16, no scale.
- ``"int8"``: symmetric, no zero point, ``q = clamp(round(M / s), -127, 127)`` with
  ``s = max|M| / 127`` (``1.0`` for an all-zero group), stored as float32. One scale for the whole
  array by default (``group_size=None``), or one scale per run of ``group_size`` consecutive cells
  (the last run may be shorter). Dequantized value: ``q * s`` in float32.

A module set to an :class:`ArrayQuantization` computes its forward from the dequantized array (the
values an exported model reads) and passes gradients straight through to the float array
(:class:`compress.methods.robe.module.RobeEmbeddingBagCollection`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from compress.errors import RecipeError

if TYPE_CHECKING:  # imported by the functions that take tensors: stored arrays need numpy alone
    import torch

ARRAY_PRECISIONS = ("fp32", "fp16", "int8")
#: Bytes a cell at each precision (int8 adds one float32 scale: :data:`INT8_SCALE_BYTES`).
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
INT8_SCALE_BYTES = 4
#: numpy dtype of a stored array at each precision.
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
_INT8_QMAX = 127


@dataclass(frozen=True)
class ArrayQuantization:
    """How the shared array is stored for export: ``precision`` in :data:`ARRAY_PRECISIONS`.

    ``group_size`` (int8 only): cells per scale; ``None`` means one scale for the whole array.
    """

    precision: str = "int8"
    group_size: int | None = None

    def __post_init__(self) -> None:
        try:
            _check_precision(self.precision, self.group_size)
        except ValueError as e:
            raise RecipeError(f"array quantization: {e}") from None


def _check_precision(precision: str, group_size: int | None) -> None:
    if precision not in ARRAY_PRECISIONS:
        raise ValueError(f"array precision must be one of {ARRAY_PRECISIONS}, got {precision!r}")
    if group_size is not None:
        if precision != "int8":
            raise ValueError(f"group_size applies to int8 only, not {precision!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` [M] padded with zeros to a multiple of ``group_size`` and viewed ``[G, group_size]``."""
    import torch

    pad = (-x.numel()) % group_size
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, group_size)


def quantize_array(
    weight: torch.Tensor, precision: str, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize a shared array for storage (see the module docstring for the scheme).

    Args:
        weight: float ``[M]``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        group_size: int8 only: cells per scale (``None``: one scale for the array).

    Returns:
        ``(data, scale)``: ``data`` float32/float16/int8 ``[M]``; ``scale`` ``None`` for fp32 and
        fp16, else float32 ``[1]`` (per array) or ``[ceil(M / group_size)]``.

    Example::

        >>> q, s = quantize_array(torch.tensor([0.5, -1.0, 0.25]), "int8")
        >>> q.tolist(), float(s)
        ([64, -127, 32], 0.007874015718698502)
    """
    import torch

    _check_precision(precision, group_size)
    w = weight.detach().reshape(-1).float()
    if precision == "fp32":
        return w.clone(), None
    if precision == "fp16":
        if w.numel() and float(w.abs().max()) > torch.finfo(torch.float16).max:
            raise ValueError("array holds values beyond the float16 range")
        return w.half(), None
    groups = _grouped(w, group_size) if group_size else w.view(1, -1)
    amax = groups.abs().amax(dim=1) if w.numel() else torch.zeros(1)
    scale = torch.where(amax > 0, amax / _INT8_QMAX, torch.ones_like(amax))
    q = torch.clamp(torch.round(groups / scale.unsqueeze(1)), -_INT8_QMAX, _INT8_QMAX)
    return q.to(torch.int8).reshape(-1)[: w.numel()].clone(), scale


def dequantize_array(
    data: torch.Tensor, scale: torch.Tensor | None, group_size: int | None = None
) -> torch.Tensor:
    """Inverse of :func:`quantize_array`: float32 ``[M]`` (``q * scale`` for int8)."""
    if scale is None:
        return data.float()
    q = data.float()
    if group_size is None:
        if scale.numel() != 1:
            raise ValueError(f"{scale.numel()} scales given without a group_size")
        return q * scale.reshape(())
    return (_grouped(q, group_size) * scale.unsqueeze(1)).reshape(-1)[: q.numel()]


def fake_quantize_array(weight: torch.Tensor, quant: ArrayQuantization) -> torch.Tensor:
    """``dequantize(quantize(weight))``: float32 ``[M]`` holding what an exported model reads."""
    data, scale = quantize_array(weight, quant.precision, quant.group_size)
    return dequantize_array(data, scale, quant.group_size)


def dequantize_stored(data: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """A stored array as the float32 values the model reads (:func:`dequantize_array` on numpy:
    fp16 cast, int8 ``q * scale`` in float32 with one scale per array); ``ValueError`` for an
    int8 array without exactly one scale."""
    if data.dtype == np.float32:
        return data
    if data.dtype == np.float16:
        return data.astype(np.float32)
    if scale is None or scale.size != 1:
        raise ValueError(
            f"shared int8 array needs exactly one scale, got {None if scale is None else scale.size}"
        )
    return data.astype(np.float32) * np.float32(scale.reshape(()))
