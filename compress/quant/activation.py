"""Static INT8 activations for MLP linears: the integer pipeline ONNX Runtime runs, in PyTorch.

A linear's input ``x [..., in]`` is quantized per tensor with a scale ``s_a`` and a zero point
``z_a`` fixed by calibration (:func:`activation_qparams`):

* codes ``u = clamp(rint(x / s_a) + z_a, 0, 255)`` (uint8, ties to even, a true division): ONNX
  ``QuantizeLinear`` (:func:`activation_codes` returns ``u - z_a`` as float32);
* ``acc[o] = sum_k (u_k - z_a) * q[o, k]`` over the per-channel weight codes ``q``
  (:mod:`compress.quant.per_channel`), an exact integer: int32 in ONNX Runtime; here float32
  sums of integers, exact whatever the summation order while no partial sum can reach ``2^24``
  (:func:`exact_in_float32`), else float64 (:func:`integer_matmul`);
* ``y = float32(acc) * float32(s_a * s_w[o]) + bias[o]``: two float32 roundings in that order
  (no fused multiply-add), what ``com.microsoft::MatMulIntegerToFloat`` computes
  (:func:`rescale`).

Each step is the same IEEE operation on both sides, so a model fine-tuned or converted with these
functions computes bit for bit what the exported graph computes from the same input
(``tests/test_int8_mlp_serving.py`` checks it against onnxruntime on random tensors). The export
holds these graphs to the same parity bound as float ones (the model class's, 1e-5 on the
logits); measured on DLRMs of dim 8 to 128 with one-hot and multi-hot bags, the logits of
PyTorch and ONNX Runtime were equal bit for bit. What could break that is a float input of a
quantized layer (the interaction, pooled sums) that PyTorch and ONNX Runtime round differently
right at a rounding boundary of its code: the parity check (and ``verify --parity`` on a serving
host) would then fail, naming the difference.

Training uses :func:`integer_linear_ste`: the forward is the integer pipeline above, the backward
a straight-through estimator (the gradient of ``x_hat @ W_hat.T + bias`` with ``x_hat = (u - z_a)
* s_a`` and ``W_hat = q * s_w``; no gradient where ``x`` was clamped, none to the scales), as
PyTorch's fake quantizers do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812

__all__ = [
    "ACTIVATION_KINDS",
    "ACTIVATION_QPARAM_BYTES",
    "CODE_MAX",
    "activation_codes",
    "activation_qparams",
    "exact_in_float32",
    "integer_linear",
    "integer_linear_ste",
    "integer_matmul",
    "rescale",
]

#: What an MLP linear's input can be: float32 as it is, or static INT8 (uint8 codes + zero point).
ACTIVATION_KINDS = ("fp32", "int8")
#: Largest activation code (uint8).
CODE_MAX = 255
#: Bytes a linear with INT8 activations stores besides its weights: float32 scale and zero point.
ACTIVATION_QPARAM_BYTES = 8
_FLOAT32_EXACT = 2**24


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point (uint8) for inputs observed in ``[lo, hi]``.

    The range is widened to hold 0 (so that 0, a ReLU's most common output, is a code exactly):
    ``s = (max(hi, 0) - min(lo, 0)) / 255`` in float32 (``1.0`` when the range is empty) and
    ``z = clamp(rint(-min(lo, 0) / s), 0, 255)``, ONNX ``DynamicQuantizeLinear``'s rule.
    """
    lo32 = torch.tensor(min(float(lo), 0.0), dtype=torch.float32)
    hi32 = torch.tensor(max(float(hi), 0.0), dtype=torch.float32)
    if not bool(torch.isfinite(lo32)) or not bool(torch.isfinite(hi32)):
        raise ValueError(f"activation range [{lo}, {hi}] is not finite")
    scale = (hi32 - lo32) / CODE_MAX
    if float(scale) == 0.0:
        return 1.0, 0
    zero_point = int(torch.round(-lo32 / scale).clamp(0, CODE_MAX))
    return float(scale), zero_point


def activation_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """``clamp(rint(x / scale) + zero_point, 0, 255) - zero_point`` as float32 (integer values in
    ``[-255, 255]``): the uint8 codes of ``QuantizeLinear`` less the zero point."""
    u = torch.div(x.to(torch.float32), scale).round_().add_(zero_point).clamp_(0, CODE_MAX)
    return u.sub_(zero_point)


def exact_in_float32(in_features: int, weight_bits: int) -> bool:
    """Whether float32 sums of ``in_features`` products of activation codes (``|u - z| <= 255``)
    and ``weight_bits``-bit weight codes (``|q| <= 2^(b-1)``) are exact in any order."""
    return in_features * CODE_MAX * 2 ** (weight_bits - 1) < _FLOAT32_EXACT


def integer_matmul(codes: torch.Tensor, qweight: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """``codes [..., in] @ qweight.T`` (``qweight [out, in]`` integer codes) as float32: the
    exact integer sum rounded to float32 once, as ``float(int32)`` rounds it."""
    w = qweight.to(codes.dtype)
    if exact_in_float32(qweight.shape[-1], weight_bits):
        return F.linear(codes, w)
    return F.linear(codes.to(torch.float64), w.to(torch.float64)).to(torch.float32)


def rescale(
    acc: torch.Tensor,
    act_scale: torch.Tensor,
    weight_scales: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``acc * float32(act_scale * weight_scales) + bias``: two float32 roundings, in that order."""
    multiplier = act_scale.to(torch.float32) * weight_scales.to(torch.float32)
    y = acc * multiplier
    return y if bias is None else y + bias


def integer_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scales: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor,
    act_zero_point: torch.Tensor,
    weight_bits: int,
) -> torch.Tensor:
    """The linear of INT8 activations and per-channel integer weights (module docstring), no
    gradient: ``x [..., in]`` float, ``qweight [out, in]`` int8 codes, ``weight_scales [out]``."""
    codes = activation_codes(x, act_scale, act_zero_point)
    acc = integer_matmul(codes, qweight, weight_bits)
    return rescale(acc, act_scale, weight_scales, bias)


class _IntegerLinearSTE(torch.autograd.Function):
    """Forward :func:`integer_linear`; backward the straight-through gradients of
    ``x_hat @ W_hat.T + bias`` to ``x`` (zero where it was clamped), the float master weight
    (identity through its quantizer) and the bias."""

    @staticmethod
    def forward(  # noqa: PLR0913 - the tensors of one linear
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        qweight: torch.Tensor,
        weight_scales: torch.Tensor,
        act_scale: torch.Tensor,
        act_zero_point: torch.Tensor,
        weight_bits: int,
    ) -> torch.Tensor:
        rounded = torch.div(x.detach().to(torch.float32), act_scale).round_().add_(act_zero_point)
        inside = (rounded >= 0) & (rounded <= CODE_MAX)
        codes = rounded.clamp_(0, CODE_MAX).sub_(act_zero_point)
        acc = integer_matmul(codes, qweight, weight_bits)
        ctx.save_for_backward(codes, inside, qweight, weight_scales, act_scale)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return rescale(acc, act_scale, weight_scales, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        codes, inside, qweight, weight_scales, act_scale = ctx.saved_tensors
        w_hat = qweight.to(grad.dtype) * weight_scales[:, None]
        grad_x = (grad @ w_hat) * inside
        flat_grad = grad.reshape(-1, grad.shape[-1])
        x_hat = (codes * act_scale).reshape(-1, codes.shape[-1])
        grad_w = (flat_grad.T @ x_hat).to(ctx.weight_dtype)
        grad_b = flat_grad.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


def integer_linear_ste(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    qweight: torch.Tensor,
    weight_scales: torch.Tensor,
    act_scale: torch.Tensor,
    act_zero_point: torch.Tensor,
    weight_bits: int,
) -> torch.Tensor:
    """:func:`integer_linear` of ``qweight``/``weight_scales`` (the codes of the float master
    ``weight``), with straight-through gradients to ``x``, ``weight`` and ``bias``."""
    return _IntegerLinearSTE.apply(
        x, weight, bias, qweight, weight_scales, act_scale, act_zero_point, weight_bits
    )
