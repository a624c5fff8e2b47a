"""Per-output-channel symmetric quantization of MLP weights: a QAT linear and its converted mirror.

- :class:`FakeQuantLinear` (prepare): an ``nn.Linear`` whose forward uses the fake-quantized weight
  (straight-through gradient); activations and biases stay FP32.
- :class:`QuantizedLinear` (convert): signed integer weights ``[out, in]`` and FP32 scales ``[out]``;
  its outputs equal the fake-quant forward's exactly.

:func:`swap_linears` applies either to every ``nn.Linear`` of a DLRM's MLPs (bottom, top and
projection branches); DCN cross-net kernels are not linears and stay FP32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from compress.quant.per_channel import (
    channel_dequantize,
    channel_quantize,
    channel_weight_bytes,
    ste_fake_quantize_channel,
)

MLP_ROOTS = ("dense_arch", "over_arch", "inter_arch")


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` with INT-``bits`` per-channel fake-quantized weights in the forward."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.bits = bits

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int) -> FakeQuantLinear:
        new = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, ste_fake_quantize_channel(self.weight, self.bits), self.bias)


class QuantizedLinear(nn.Module):
    """Integer weights ``qweight`` int8 ``[out, in]`` (values within INT-``bits``), ``scales`` ``[out]``."""

    def __init__(
        self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, bits: int
    ) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        q, scales = channel_quantize(linear.weight.detach(), bits)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(q, scales, bias, bits)

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
        return weight + (self.bias.numel() * 4 if self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, channel_dequantize(self.qweight, self.scales), self.bias)


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
