"""Rebuild a TorchRec DLRM from a :class:`~compress.spec.DLRMSpec` and load its weights strictly.

The module is built on the ``meta`` device and the checkpoint's tensors are assigned into it
(``load_state_dict(strict=True, assign=True)``), so a memory-mapped checkpoint is not copied: a model
whose tables are larger than RAM still loads, and pages are read only when rows are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compress.architecture import EBC_PREFIX, infer_spec, load_model_config
from compress.checkpoint import Checkpoint, load_tensors, open_checkpoint
from compress.errors import CheckpointError
from compress.spec import DLRMSpec, TableSpec


@dataclass
class LoadedModel:
    """A checkpoint, its inferred architecture, and the rebuilt TorchRec module (eval mode)."""

    checkpoint: Checkpoint
    spec: DLRMSpec
    module: nn.Module


def read_spec(
    path: str | Path, model_config: str | Path | dict | None = None
) -> tuple[Checkpoint, DLRMSpec]:
    """Open ``path`` and infer its architecture, reading shapes only."""
    ckpt = open_checkpoint(path)
    cfg = load_model_config(model_config) if isinstance(model_config, str | Path) else model_config
    spec = infer_spec(
        ckpt.tensors,
        source=str(ckpt.path),
        model_config=cfg,
        natural_table_order=ckpt.format == "dcp",
    )
    return ckpt, spec


def load_model(path: str | Path, model_config: str | Path | dict | None = None) -> LoadedModel:
    """Open a checkpoint, infer its architecture, rebuild the model and load every tensor strictly."""
    ckpt, spec = read_spec(path, model_config)
    module = build_model(spec, device="meta")
    state = strip_prefix(load_tensors(ckpt), spec.key_prefix)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt.path}: state dict does not load into the rebuilt {spec.model_class}: {str(e).splitlines()[0]}"
        ) from e
    module.eval()
    return LoadedModel(checkpoint=ckpt, spec=spec, module=module)


def build_model(spec: DLRMSpec, device: str | torch.device = "cpu") -> nn.Module:
    """A freshly initialised TorchRec model with ``spec``'s shapes (``device="meta"`` allocates nothing)."""
    device = torch.device(device)
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(spec.tables), device=device)
    common = {
        "embedding_bag_collection": ebc,
        "dense_in_features": spec.dense_in_features,
        "dense_arch_layer_sizes": list(spec.dense_arch_layer_sizes),
        "over_arch_layer_sizes": list(spec.over_arch_layer_sizes),
        "dense_device": device,
    }
    if spec.model_class == "DLRM":
        return DLRM(**common)
    if spec.model_class == "DLRM_DCN":
        return DLRM_DCN(
            **common, dcn_num_layers=spec.dcn_num_layers, dcn_low_rank_dim=spec.dcn_low_rank_dim
        )
    if spec.model_class == "DLRM_Projection":
        return DLRM_Projection(
            **common,
            interaction_branch1_layer_sizes=list(spec.interaction_branch1_layer_sizes or ()),
            interaction_branch2_layer_sizes=list(spec.interaction_branch2_layer_sizes or ()),
        )
    raise ValueError(f"unknown model class {spec.model_class}")


def embedding_bag_configs(tables: Sequence[TableSpec]) -> list[EmbeddingBagConfig]:
    """TorchRec configs (sum pooling, FP32) of ``tables``, in order (anything with ``name``,
    ``num_embeddings``, ``embedding_dim`` and ``feature_names``, such as a :class:`TableSpec`)."""
    return [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=t.embedding_dim,
            num_embeddings=t.num_embeddings,
            feature_names=list(t.feature_names),
        )
        for t in tables
    ]


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items()} if prefix else dict(state)


def table_weight_key(table: str) -> str:
    """State-dict key of a table's weight inside a (prefix-free) DLRM."""
    return f"{EBC_PREFIX}{table}.weight"
