"""Per-output-channel symmetric quantization of MLP weights: a QAT linear and its converted mirror.

- :class:`FakeQuantLinear` (prepare): an ``nn.Linear`` whose forward uses the fake-quantized weight
  (straight-through gradient); activations and biases stay FP32, or, with ``activations="int8"``,
  its input is quantized to static INT8 by an :class:`ActivationQuantizer` and the layer computes
  in integers (:mod:`compress.quant.activation`).
- :class:`QuantizedLinear` (convert): signed integer weights ``[out, in]`` and FP32 scales ``[out]``
  (and the same activation quantizer); its outputs equal the fake-quant forward's exactly.

An :class:`ActivationQuantizer` holds a scale and a zero point (buffers ``scale``, ``zero_point``,
float32 scalars; NaN scale until calibrated). :func:`calibrate_activations` runs the model on
calibration batches with every quantizer observing its input's range (float activations), then
fixes each quantizer's scale and zero point (:func:`~compress.quant.activation.activation_qparams`);
fine-tuning keeps them fixed (static quantization: a sample's score never depends on its batch).

:func:`swap_linears` applies either to every ``nn.Linear`` of a DLRM's MLPs (bottom, top and
projection branches); DCN cross-net kernels are not linears and stay FP32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from compress.quant.activation import (
    ACTIVATION_KINDS,
    ACTIVATION_QPARAM_BYTES,
    activation_qparams,
    integer_linear,
    integer_linear_ste,
)
from compress.quant.per_channel import (
    channel_dequantize,
    channel_quantize,
    channel_weight_bytes,
    ste_fake_quantize_channel,
)

MLP_ROOTS = ("dense_arch", "over_arch", "inter_arch")


class ActivationQuantizer(nn.Module):
    """Static INT8 quantization of a linear's input: buffers ``scale`` and ``zero_point``
    (float32 scalars; the zero point an integer in ``[0, 255]``), set by :meth:`freeze` from the
    range observed while :attr:`observing`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(float("nan")))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.observing = False
        self.observed: tuple[float, float] | None = None

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.scale))

    def observe(self, x: torch.Tensor) -> None:
        """Widen the observed range to hold ``x``."""
        if x.numel() == 0:
            return
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if self.observed is not None:
            lo, hi = min(lo, self.observed[0]), max(hi, self.observed[1])
        self.observed = (lo, hi)

    def freeze(self) -> None:
        """Set ``scale`` and ``zero_point`` from the observed range and stop observing."""
        if self.observed is None:
            raise RuntimeError("activation quantizer saw no input during calibration")
        scale, zero_point = activation_qparams(*self.observed)
        self.scale.fill_(scale)
        self.zero_point.fill_(float(zero_point))
        self.observing = False

    def check(self) -> None:
        if not self.calibrated:
            raise RuntimeError(
                "INT8 activations are not calibrated: run calibrate_activations on the model first"
            )


def _input_quantizer(activations: str) -> ActivationQuantizer | None:
    if activations not in ACTIVATION_KINDS:
        raise ValueError(f"activations must be one of {ACTIVATION_KINDS}, got {activations!r}")
    return ActivationQuantizer() if activations == "int8" else None


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` with INT-``bits`` per-channel fake-quantized weights in the forward; with
    ``activations="int8"`` the input is quantized too (``input_quant``) and the forward is the
    integer pipeline ONNX Runtime serves (:func:`~compress.quant.activation.integer_linear_ste`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool = True,
        activations: str = "fp32",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.bits = bits
        self.input_quant = _input_quantizer(activations)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, activations: str = "fp32") -> FakeQuantLinear:
        new = cls(
            linear.in_features,
            linear.out_features,
            bits,
            bias=linear.bias is not None,
            activations=activations,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    @property
    def activations(self) -> str:
        return "fp32" if self.input_quant is None else "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant = self.input_quant
        if quant is None or quant.observing:
            if quant is not None:
                quant.observe(x)
            return F.linear(x, ste_fake_quantize_channel(self.weight, self.bits), self.bias)
        quant.check()
        qweight, scales = channel_quantize(self.weight.detach(), self.bits)
        return integer_linear_ste(
            x, self.weight, self.bias, qweight, scales, quant.scale, quant.zero_point, self.bits
        )


class QuantizedLinear(nn.Module):
    """Integer weights ``qweight`` int8 ``[out, in]`` (values within INT-``bits``), ``scales`` ``[out]``."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        input_quant: ActivationQuantizer | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.input_quant = input_quant

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, activations: str = "fp32") -> QuantizedLinear:
        """The converted ``linear``: a float one (PTQ, with a fresh input quantizer when
        ``activations="int8"``) or a :class:`FakeQuantLinear` (its calibrated quantizer kept)."""
        q, scales = channel_quantize(linear.weight.detach(), bits)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        if isinstance(linear, FakeQuantLinear) and linear.input_quant is not None:
            quant = copy.deepcopy(linear.input_quant)
        else:
            quant = _input_quantizer(activations)
        return cls(q, scales, bias, bits, quant)

    @property
    def activations(self) -> str:
        return "fp32" if self.input_quant is None else "int8"

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes at the quantized width: packed weight rows, fp32 scales, fp32 bias."""
        weight = channel_weight_bytes(self.out_features, self.in_features, self.bits)
        quant = ACTIVATION_QPARAM_BYTES if self.input_quant is not None else 0
        return weight + quant + (self.bias.numel() * 4 if self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant = self.input_quant
        if quant is None or quant.observing:
            if quant is not None:
                quant.observe(x)
            return F.linear(x, channel_dequantize(self.qweight, self.scales), self.bias)
        quant.check()
        return integer_linear(
            x, self.qweight, self.scales, self.bias, quant.scale, quant.zero_point, self.bits
        )


def mlp_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every MLP linear (float, fake-quant or quantized), in model order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if name.split(".")[0] in MLP_ROOTS and isinstance(m, nn.Linear | QuantizedLinear)
    ]


def swap_linears(model: nn.Module, make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every MLP linear of ``model`` with ``make(linear)``; returns how many were swapped."""
    swapped = 0
    for name, linear in mlp_linears(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, nn.Sequential | nn.ModuleList):
            parent[int(attr)] = make(linear)
        else:
            setattr(parent, attr, make(linear))
        swapped += 1
    return swapped


def activation_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    """The input quantizers of ``model``'s MLP linears (INT8 activations), in model order."""
    return [
        m.input_quant for _, m in mlp_linears(model) if getattr(m, "input_quant", None) is not None
    ]


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable) -> int:
    """Fix the INT8 activation ranges of ``model``'s linears from calibration inputs.

    Every quantizer observes its input (float activations, weights as quantized) while the DLRM
    scores each of ``batches`` (``compress.data.batches.Batch``-like: ``.dense``, ``.sparse``);
    then each quantizer's scale and zero point are set from the range it saw. Returns the number
    of quantizers (0: nothing to do, no batch read). The model's training mode is restored.
    """
    quantizers = activation_quantizers(model)
    if not quantizers:
        return 0
    for q in quantizers:
        q.observing, q.observed = True, None
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch.dense, batch.sparse)
    finally:
        for q in quantizers:
            q.observing = False
        model.train(was_training)
    for q in quantizers:
        q.freeze()
    return len(quantizers)
