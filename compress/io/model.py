"""Rebuild a TorchRec DLRM from a :class:`~compress.io.model_spec.DLRMSpec` and load its weights strictly.

The module is built on the ``meta`` device and the checkpoint's tensors are assigned into it
(``load_state_dict(strict=True, assign=True)``), so a memory-mapped float32 checkpoint is not
copied: a model whose tables are larger than RAM still loads. Before that, every key must be one
the rebuilt model has, with its shape (missing and extra keys are named), and every weight must be
finite: the tables are scanned in chunks (read from the file into chunk buffers, so the scan maps
none of the file's pages; :mod:`compress.io.table_stream`), and a NaN or inf is an error naming
the table and row. float16/bfloat16 weights are converted to float32 (exactly), the
precision TorchRec's modules compute in; that copy is the one extra memory a half-precision
checkpoint costs.

A model config is looked for, when none is given, as ``model_config.json`` inside a DCP directory,
then beside the checkpoint (:func:`find_model_config`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compress.errors import CheckpointError, ModelConfigError
from compress.io.architecture import infer_spec
from compress.io.checkpoint import Checkpoint, load_tensors, open_checkpoint
from compress.io.dlrm_classes import strategy_for
from compress.io.dlrm_classes.base import table_of_key
from compress.io.model_config import full_model_config, load_model_config
from compress.io.model_spec import DLRMSpec, TableSpec
from compress.io.table_stream import progress_bytes, row_chunks
from compress.quant.tablewise import absmax


@dataclass
class LoadedModel:
    """A checkpoint, its inferred architecture, and the rebuilt TorchRec module (eval mode).

    A live module given to ``pipeline.load`` (:mod:`compress.io.live_model`) has no ``checkpoint``;
    ``origin`` then describes it, and the module is the caller's own, in the mode it was in.
    """

    checkpoint: Checkpoint | None
    spec: DLRMSpec
    module: nn.Module
    origin: str = ""

    @property
    def source(self) -> str:
        """Where the model came from: the checkpoint's path, or :attr:`origin`."""
        return str(self.checkpoint.path) if self.checkpoint is not None else self.origin


MODEL_CONFIG_NAME = "model_config.json"


def model_config_candidates(checkpoint: str | Path) -> list[Path]:
    """Where a model config is looked for: inside a DCP directory, then beside the checkpoint."""
    checkpoint = Path(checkpoint)
    inside = [checkpoint / MODEL_CONFIG_NAME] if checkpoint.is_dir() else []
    return [*inside, checkpoint.parent / MODEL_CONFIG_NAME]


def find_model_config(checkpoint: str | Path) -> Path | None:
    """The first of :func:`model_config_candidates` that exists, else ``None``."""
    return next((p for p in model_config_candidates(checkpoint) if p.is_file()), None)


def read_spec(
    path: str | Path, model_config: str | Path | dict | None = None, *, lenient: bool = False
) -> tuple[Checkpoint, DLRMSpec]:
    """Open ``path`` and infer its architecture, reading shapes only.

    Without ``model_config``, :func:`find_model_config` supplies one if present. ``lenient`` is
    for writing a config template (see :func:`compress.io.architecture.infer_spec`).
    """
    ckpt = open_checkpoint(path)
    searched: list[Path] = []
    if model_config is None:
        searched = model_config_candidates(ckpt.path)
        model_config = find_model_config(ckpt.path)
    cfg = load_model_config(model_config) if isinstance(model_config, str | Path) else model_config
    spec = infer_spec(
        ckpt.tensors,
        source=str(ckpt.path),
        model_config=cfg,
        unordered_keys=ckpt.unordered_keys,
        config_searched=searched,
        lenient=lenient,
    )
    return ckpt, spec


def load_model(path: str | Path, model_config: str | Path | dict | None = None) -> LoadedModel:
    """Open a checkpoint, infer its architecture, rebuild the model and load every tensor strictly."""
    ckpt, spec = read_spec(path, model_config)
    module = build_model(spec, device="meta")
    state = strip_prefix(load_tensors(ckpt), spec.key_prefix)
    check_state_keys(state, module.state_dict(), source=str(ckpt.path), prefix=spec.key_prefix)
    total = sum(v.numel() * v.element_size() for v in state.values())
    with progress_bytes(total, "check weights"):
        state = {
            k: float32_checked(v, _weight_name(k, spec.key_prefix), str(ckpt.path))
            for k, v in state.items()
        }
    module.load_state_dict(state, strict=True, assign=True)
    module.eval()
    return LoadedModel(checkpoint=ckpt, spec=spec, module=module)


def check_state_keys(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    source: str,
    prefix: str = "",
) -> None:
    """Raise :class:`CheckpointError` naming the missing and extra keys of ``state`` against the
    rebuilt model's ``expected`` state dict, or the first key whose shape differs."""
    missing = [prefix + k for k in expected if k not in state]
    extra = [prefix + k for k in state if k not in expected]
    if missing or extra:
        parts = [
            f"{what} {len(keys)} key(s): {_preview(keys)}"
            for what, keys in (("missing", missing), ("extra", extra))
            if keys
        ]
        raise CheckpointError(
            f"{source}: state dict does not match the rebuilt model: " + "; ".join(parts)
        )
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{source}: {prefix}{k} has shape {tuple(state[k].shape)}, the rebuilt model "
                f"expects {tuple(t.shape)}"
            )


def float32_checked(t: torch.Tensor, name: str, source: str) -> torch.Tensor:
    """``t`` as float32 (itself when it already is, so a memory map stays one), scanned in chunks
    of rows (a memory-mapped tensor read from its file, :func:`compress.io.table_stream.row_chunks`:
    the scan maps none of its pages); a NaN or inf is a :class:`CheckpointError` naming ``name``
    and the first bad row."""
    out = t if t.dtype == torch.float32 else torch.empty(t.shape, dtype=torch.float32)
    if t.numel() == 0:
        return out
    row = max(1, t.shape[-1]) if t.dim() > 1 else 1
    rows_in, rows_out = t.reshape(-1, row), out.reshape(-1, row)
    for start, stop, chunk in row_chunks(rows_in):
        if out is not t:
            chunk = rows_out[start:stop].copy_(chunk)
        if math.isfinite(absmax(chunk)):  # one compiled pass (else aminmax): inf and NaN show
            continue
        bad = (~torch.isfinite(chunk)).nonzero()
        if len(bad):
            first = (start + int(bad[0, 0])) * row + int(bad[0, 1])
            where = f"row {first // row}" if t.dim() > 1 else f"element {first}"
            raise CheckpointError(f"{source}: {name} has a NaN or inf weight ({where})")
    return out


def _weight_name(key: str, prefix: str) -> str:
    """``table <name>`` for a table's weight, else the full state-dict key."""
    table = table_of_key(key)
    return f"table {table}" if table is not None else f"{prefix}{key}"


def _preview(keys: Sequence[str], limit: int = 4) -> str:
    head = ", ".join(keys[:limit])
    return head + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def build_model(spec: DLRMSpec, device: str | torch.device = "cpu") -> nn.Module:
    """A freshly initialised TorchRec model with ``spec``'s shapes (``device="meta"`` allocates
    nothing), of the class its strategy builds (:mod:`compress.io.dlrm_classes`)."""
    strategy = strategy_for(spec.model_class)
    device = torch.device(device)
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(spec.tables), device=device)
    return strategy.build(spec, ebc, device)


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


def read_spec_for_template(
    path: str | Path, model_config: str | Path | dict | None = None
) -> tuple[Checkpoint, DLRMSpec, str | None]:
    """:func:`read_spec` for writing a model-config template from any checkpoint: when the
    checkpoint cannot be rebuilt without a config (unknown table order, tables serving several
    features), the spec is read leniently and the third item says what the template must fix."""
    try:
        ckpt, spec = read_spec(path, model_config)
        return ckpt, spec, None
    except ModelConfigError as e:
        problem = str(e)
    ckpt, spec = read_spec(path, model_config, lenient=True)
    return ckpt, spec, problem


def write_model_config(path: str | Path, spec: DLRMSpec) -> None:
    """Write ``spec``'s whole model config (:func:`compress.io.model_config.full_model_config`:
    names, order, every shape) as JSON to ``path``; an existing file is not overwritten."""
    path = Path(path)
    if path.exists():
        raise ModelConfigError(f"{path}: already exists; remove it or name another file")
    try:
        path.write_text(json.dumps(full_model_config(spec), indent=2) + "\n")
    except OSError as e:
        raise ModelConfigError(f"{path}: cannot write: {e.strerror or e}") from e
