"""``DLRM_Projection``: two MLP branches over ``cat(dense, sparse)`` multiplied together
(TorchRec ``InteractionProjectionArch``).

Keys: ``inter_arch.interaction_branch{1,2}.model._mlp.<i>._linear.{weight,bias}``, each branch an
MLP with ReLU after every layer taking ``(F+1)*D`` inputs; branch ``k`` ends at ``F_k*D``. The
output is ``cat(dense, bmm(b1.reshape(F1, D), b2.reshape(D, F2)).flatten())``: ``D + F1*F2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from compress.io.dlrm_classes.base import (
    SIZES,
    ConfigKey,
    DLRMClass,
    InteractionShape,
    LinearLayer,
    chain,
    exact_div,
    mlp_key_pattern,
    mlp_weights,
)
from compress.io.model_spec import DLRMSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Module path template of branch ``k``'s linears (``{}``: the layer index).
BRANCH_MLP = "inter_arch.interaction_branch{k}.model._mlp.{{}}._linear"
#: The branches' group names (:meth:`DLRMClass.interaction_linears`) and their numbers.
BRANCHES = {"branch1": 1, "branch2": 2}


def branch_template(k: int) -> str:
    return BRANCH_MLP.format(k=k)


def projection_output_width(dim: int, branch1_out: int, branch2_out: int) -> int:
    """``D + (b1/D)*(b2/D)`` for branch output widths ``b1``, ``b2``."""
    return dim + (branch1_out // dim) * (branch2_out // dim)


class ProjectionDLRM(DLRMClass):
    """TorchRec ``DLRM_Projection``."""

    name = "DLRM_Projection"

    @property
    def module_type(self) -> type[nn.Module]:
        from torchrec.models.dlrm import DLRM_Projection

        return DLRM_Projection

    interaction = "projection"
    config_keys = (
        ConfigKey(
            "interaction_branch1_layer_sizes",
            SIZES,
            "branch 1's MLP layer sizes; the last is a multiple of the embedding dim",
        ),
        ConfigKey(
            "interaction_branch2_layer_sizes",
            SIZES,
            "branch 2's MLP layer sizes; the last is a multiple of the embedding dim",
        ),
    )
    interaction_fields = tuple(k.name for k in config_keys)

    def claims(self, sd: Mapping[str, torch.Tensor]) -> bool:
        patterns = [mlp_key_pattern(branch_template(k)) for k in BRANCHES.values()]
        return any(p.match(k) for k in sd for p in patterns)

    def infer_interaction(
        self, sd: Mapping[str, torch.Tensor], *, dim: int, over_in: int, source: str
    ) -> InteractionShape:
        b1, b2 = (mlp_weights(sd, branch_template(k), source, g) for g, k in BRANCHES.items())
        num_features = exact_div(b1[0].shape[1], dim, source, "projection branch input width") - 1
        return InteractionShape(
            num_features,
            {
                "interaction_branch1_layer_sizes": tuple(w.shape[0] for w in b1),
                "interaction_branch2_layer_sizes": tuple(w.shape[0] for w in b2),
            },
        )

    def shape_problem(self, spec: DLRMSpec) -> str | None:
        # TorchRec reshapes branch k's output to (F_k, D): it must be a multiple of D
        for key in self.config_keys:
            last = getattr(spec, key.name)[-1]
            if last % spec.embedding_dim:
                return (
                    f"{key.name} ends at {last}, not a multiple of the embedding dim "
                    f"{spec.embedding_dim}"
                )
        return None

    def constructor_kwargs(self, spec: DLRMSpec) -> dict[str, Any]:
        return {
            "interaction_branch1_layer_sizes": list(spec.interaction_branch1_layer_sizes or ()),
            "interaction_branch2_layer_sizes": list(spec.interaction_branch2_layer_sizes or ()),
        }

    def _branch_sizes(self, spec: DLRMSpec) -> dict[str, tuple[int, ...]]:
        return {
            "branch1": spec.interaction_branch1_layer_sizes or (),
            "branch2": spec.interaction_branch2_layer_sizes or (),
        }

    def over_in_width(self, spec: DLRMSpec) -> int:
        sizes = self._branch_sizes(spec)
        return projection_output_width(
            spec.embedding_dim, sizes["branch1"][-1], sizes["branch2"][-1]
        )

    def interaction_linears(self, spec: DLRMSpec) -> dict[str, tuple[LinearLayer, ...]]:
        width = self.interaction_in_width(spec)
        return {
            group: chain(branch_template(BRANCHES[group]), width, sizes)
            for group, sizes in self._branch_sizes(spec).items()
        }

    def interaction_summary(self, spec: DLRMSpec) -> dict[str, Any]:
        sizes = self._branch_sizes(spec)
        return {
            "type": self.interaction,
            "branch1_layer_sizes": list(sizes["branch1"]),
            "branch2_layer_sizes": list(sizes["branch2"]),
        }
