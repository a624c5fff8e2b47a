"""``DLRM``: the dot-product interaction (TorchRec ``InteractionArch``), no interaction weights.

The interaction output is ``cat(dense, triu(Gram(cat(dense, sparse))))``: ``D + F*(F+1)/2`` values
for ``F`` sparse features of dim ``D`` (the strict upper triangle of the ``(F+1) x (F+1)`` Gram
matrix). With no weights of its own, a state dict shows this class by holding no ``inter_arch``
key (it is also the registry's fallback: a state dict with interaction keys no class claims is
rebuilt as a ``DLRM``, whose strict key check then names them), and its number of features follows
from the over arch's input width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from compress.errors import CheckpointError
from compress.io.dlrm_classes.base import INTER_ARCH, DLRMClass, InteractionShape
from compress.io.model_spec import DLRMSpec

if TYPE_CHECKING:
    import torch
    from torch import nn


def dot_output_width(num_features: int, dim: int) -> int:
    """``D + F*(F+1)/2``: the dot interaction's output width."""
    return dim + num_features * (num_features + 1) // 2


class DotDLRM(DLRMClass):
    """TorchRec ``DLRM``."""

    name = "DLRM"

    @property
    def module_type(self) -> type[nn.Module]:
        from torchrec.models.dlrm import DLRM

        return DLRM

    interaction = "dot"

    def claims(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return not any(k.startswith(INTER_ARCH + ".") for k in sd)

    def infer_interaction(
        self, sd: Mapping[str, torch.Tensor], *, dim: int, over_in: int, source: str
    ) -> InteractionShape:
        # over-arch input = D + F*(F+1)/2  =>  F^2 + F - 2*(over_in - D) = 0
        width = over_in - dim
        f = int((math.isqrt(1 + 8 * width) - 1) // 2)
        if f * (f + 1) // 2 != width or f < 1:
            raise CheckpointError(f"{source}: top MLP input width does not fit a dot interaction")
        return InteractionShape(f)

    def constructor_kwargs(self, spec: DLRMSpec) -> dict[str, Any]:
        return {}

    def over_in_width(self, spec: DLRMSpec) -> int:
        return dot_output_width(spec.num_sparse_features, spec.embedding_dim)
