"""``DLRM_DCN``: a low-rank cross network over ``cat(dense, sparse)`` (TorchRec
``InteractionDCNArch`` with ``LowRankCrossNet``).

Keys: ``inter_arch.crossnet.W_kernels.<l>`` ``[(F+1)*D, r]``, ``inter_arch.crossnet.V_kernels.<l>``
``[r, (F+1)*D]``, ``inter_arch.crossnet.bias.<l>`` ``[(F+1)*D]`` for layers ``l = 0..L-1``. The
output keeps the input width ``(F+1)*D``. The kernels are not ``nn.Linear`` layers: they are never
quantized and are stored as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from compress.errors import CheckpointError
from compress.io.dlrm_classes.base import (
    COUNT,
    ConfigKey,
    CrossLayerKeys,
    DLRMClass,
    InteractionShape,
    exact_div,
)
from compress.io.model_spec import DLRMSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Key of one cross-layer tensor: ``kind`` is ``W_kernels``, ``V_kernels`` or ``bias``.
CROSS_KEY = "inter_arch.crossnet.{kind}.{layer}"
_CROSS_RE = re.compile(r"inter_arch\.crossnet\.(W_kernels|V_kernels|bias)\.(\d+)$")


def cross_key(kind: str, layer: int) -> str:
    return CROSS_KEY.format(kind=kind, layer=layer)


class DCNDLRM(DLRMClass):
    """TorchRec ``DLRM_DCN``."""

    name = "DLRM_DCN"

    @property
    def module_type(self) -> type[nn.Module]:
        from torchrec.models.dlrm import DLRM_DCN

        return DLRM_DCN

    interaction = "dcn"
    config_keys = (
        ConfigKey("dcn_num_layers", COUNT, "number of low-rank cross layers"),
        ConfigKey("dcn_low_rank_dim", COUNT, "rank of each cross layer's W and V kernels"),
    )
    interaction_fields = tuple(k.name for k in config_keys)

    def claims(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return any(_CROSS_RE.match(k) for k in sd)

    def infer_interaction(
        self, sd: Mapping[str, torch.Tensor], *, dim: int, over_in: int, source: str
    ) -> InteractionShape:
        w_prefix = CROSS_KEY.format(kind="W_kernels", layer="")
        n_layers = sum(1 for k in sd if k.startswith(w_prefix))
        first = cross_key("W_kernels", 0)
        if first not in sd:
            raise CheckpointError(f"{source}: missing {first} (a DLRM_DCN's first cross layer)")
        in_dim, low_rank = sd[first].shape
        num_features = exact_div(in_dim, dim, source, "crossnet input width") - 1
        return InteractionShape(
            num_features, {"dcn_num_layers": n_layers, "dcn_low_rank_dim": low_rank}
        )

    def constructor_kwargs(self, spec: DLRMSpec) -> dict[str, Any]:
        return {"dcn_num_layers": spec.dcn_num_layers, "dcn_low_rank_dim": spec.dcn_low_rank_dim}

    def over_in_width(self, spec: DLRMSpec) -> int:
        return self.interaction_in_width(spec)

    def cross_layers(self, spec: DLRMSpec) -> tuple[CrossLayerKeys, ...]:
        width, rank = self.interaction_in_width(spec), spec.dcn_low_rank_dim or 0
        return tuple(
            CrossLayerKeys(
                cross_key("W_kernels", i),
                cross_key("V_kernels", i),
                cross_key("bias", i),
                width,
                rank,
            )
            for i in range(spec.dcn_num_layers or 0)
        )

    def interaction_summary(self, spec: DLRMSpec) -> dict[str, Any]:
        return {
            "type": self.interaction,
            "num_layers": spec.dcn_num_layers,
            "low_rank_dim": spec.dcn_low_rank_dim,
        }
