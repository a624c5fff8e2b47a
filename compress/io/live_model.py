"""A TorchRec DLRM already in memory as the pipeline's input (``pipeline.load(module)``).

A state dict does not name features; a live module does: its ``EmbeddingBagCollection`` configs
give every table's name, features, shape and order. :func:`load_module` reads them into a model
config, infers the rest of the architecture from the module's state dict with the same code that
reads checkpoint files (:func:`compress.io.architecture.infer_spec`), checks that the module is the
DLRM that architecture rebuilds (every state-dict key and shape), and returns a
:class:`~compress.io.model.LoadedModel` that holds the module itself: nothing is copied, and the
pipeline never changes it (``prepare_model`` works on a copy; evaluation restores its mode).

Accepted: ``torchrec.models.dlrm`` ``DLRM``, ``DLRM_DCN``, ``DLRM_Projection``, or any of them
wrapped in ``DLRMTrain`` (its ``model``; the spec records the ``model.`` key prefix). The tables
must be a plain TorchRec ``EmbeddingBagCollection`` (sum pooling, unweighted) and every tensor
finite float32 on the CPU; anything else is a :class:`~compress.errors.CheckpointError` naming
what to change.

Example::

    job = pipeline.load(trained_dlrm)            # a DLRM or DLRMTrain object
    plan = pipeline.plan(job, "int4_qat")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compress.errors import CheckpointError, ModelConfigError
from compress.io.architecture import infer_spec
from compress.io.dlrm_classes import strategy_of_module
from compress.io.dlrm_classes.base import EBC_PATH, ebc_of, unwrap
from compress.io.model import LoadedModel, build_model, check_state_keys, float32_checked
from compress.io.model_spec import DLRMSpec


def model_class_of(module: nn.Module) -> str:
    """The registered class name of a live DLRM (subclasses count as their base,
    :func:`compress.io.dlrm_classes.strategy_of_module`)."""
    return strategy_of_module(module).name


def model_config_of(dlrm: nn.Module, source: str) -> dict:
    """The model config (:mod:`compress.io.architecture`) of a live DLRM: its class, and its tables
    in EBC order with their names, features and shapes."""
    ebc = ebc_of(dlrm)
    if type(ebc) is not EmbeddingBagCollection:
        raise CheckpointError(
            f"{source}: {EBC_PATH} is a {type(ebc).__name__}; a plain "
            "TorchRec EmbeddingBagCollection is needed (unshard or unwrap it first)"
        )
    if ebc.is_weighted():
        raise CheckpointError(f"{source}: a weighted EmbeddingBagCollection is not supported")
    tables = []
    for cfg in ebc.embedding_bag_configs():
        if cfg.pooling != PoolingType.SUM:
            raise CheckpointError(
                f"{source}: table {cfg.name!r} uses {cfg.pooling.value} pooling; only SUM is "
                "supported"
            )
        tables.append(
            {
                "name": cfg.name,
                "feature_names": list(cfg.feature_names),
                "num_embeddings": cfg.num_embeddings,
                "embedding_dim": cfg.embedding_dim,
            }
        )
    return {"model_class": model_class_of(dlrm), "tables": tables}


def _check_tensors(dlrm: nn.Module, prefix: str, source: str) -> None:
    """Every tensor float32 on the CPU and finite (tables scanned in chunks, nothing copied)."""
    for key, t in dlrm.state_dict().items():
        name = prefix + key
        if t.device.type != "cpu":
            raise CheckpointError(
                f"{source}: {name} is on {t.device}; move the model to the CPU first (.cpu())"
            )
        if t.dtype != torch.float32:
            raise CheckpointError(
                f"{source}: {name} is {t.dtype}; convert the model to float32 first (.float())"
            )
        float32_checked(t, name, source)


def spec_of_module(module: nn.Module, source: str | None = None) -> tuple[nn.Module, DLRMSpec]:
    """``(the DLRM inside module, its DLRMSpec)``; :class:`CheckpointError` when ``module`` is not a
    TorchRec DLRM the pipeline can take, or its structure is not what its architecture rebuilds."""
    source = source or f"<{type(module).__name__} module>"
    dlrm, prefix = unwrap(module)
    model_class_of(dlrm)
    config = model_config_of(dlrm, source)
    state = dlrm.state_dict()
    spec = infer_spec({prefix + k: v for k, v in state.items()}, source=source, model_config=config)
    _check_tensors(dlrm, prefix, source)
    expected = build_model(spec, device="meta").state_dict()
    check_state_keys(state, expected, source=source, prefix=prefix)
    return dlrm, spec


def load_module(module: nn.Module, model_config: str | Path | dict | None = None) -> LoadedModel:
    """A :class:`LoadedModel` over a live TorchRec DLRM (or ``DLRMTrain``), used as it is.

    ``model_config`` must be ``None``: the module's EBC configs already name its tables and
    features (a :class:`ModelConfigError` otherwise).
    """
    source = f"<{type(module).__name__} module>"
    if model_config is not None:
        raise ModelConfigError(
            f"{source}: a model config applies to checkpoint files; a live module's "
            "EmbeddingBagCollection configs give its tables, features and order"
        )
    dlrm, spec = spec_of_module(module, source)
    return LoadedModel(checkpoint=None, spec=spec, module=dlrm, origin=source)
