"""An artifact directory back as a TorchRec DLRM: FBGEMM tables, shared arrays, float MLPs.

:func:`load_torchrec_model` reads a directory written by :func:`exporters.artifacts.write.save` (through
:func:`exporters.artifacts.read.load_artifacts`: manifest digest and schema, every checksum, every path
confined to the directory) and returns the model class the checkpoint had (``DLRM``,
``DLRM_DCN`` or ``DLRM_Projection``, from ``torchrec.models.dlrm``), in eval mode, that computes
what the directory's ONNX graph computes:

- **Tables** go to TorchRec's quantized ``EmbeddingBagCollection``
  (``torchrec.quant.embedding_modules``, FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen``
  kernels) whenever FBGEMM's rows hold them exactly (:func:`exporters.runtime.torchrec_ebc.fbgemm_data_type`):
  row-wise INT8/INT4/INT2 tables as stored, ``fp32``/``fp16`` tables as FP32/FP16 rows, and
  table-wise tables converted to row-wise rows (codes ``q + 2^(b-1)``, fp16 scale ``s``, bias
  ``-2^(b-1)*s``: ``code*s + bias == q*s`` bit for bit). That conversion needs ``s`` to be an fp16
  value, which the table-wise quantizer guarantees by rounding every scale up to one, and the bias
  ``-2^(b-1)*s`` to be a finite fp16 number, which fails only when ``2^(b-1)*s > 65504`` (a table
  with ``max|W|`` in the tens of thousands). Such a table (and a table of any method without
  FBGEMM rows) is not approximated: it stays in this project's
  :class:`~compress.methods.qat_embedding.QuantizedEmbeddingBagCollection` (its method's
  converted table, arrays as buffers, dequantized exactly as the ONNX graph does), and
  :func:`table_placement` says so. Each table's method decides
  (:mod:`compress.methods.registry`).
- **Shared (ROBE-Z) arrays** become
  :class:`~compress.methods.robe.module.RobeEmbeddingBagCollection` modules
  with the hash parameters of the manifest; the array is held in float32, dequantized from its
  stored fp16/int8 form exactly as the ONNX graph dequantizes it.
- **MLP linears** are plain ``nn.Linear`` layers holding the dequantized weights
  ``qweight * scales[:, None]`` (float32, the products the ONNX graph's ``Cast`` + ``Mul``
  computes), float layers and DCN kernels as stored. A linear stored with INT8 activations
  (``[mlp] activations = "int8"``) becomes :class:`~compress.methods.qat_linear.QuantizedLinear`
  with its input quantizer: the integer pipeline the graph computes, bit for bit.

When more than one kind of table module is needed they are joined by
:class:`~compress.methods.combined.CombinedEmbeddingBagCollection` (the EBC interface, outputs in the model's
feature order); otherwise the sparse arch holds TorchRec's quantized EBC itself. Ids must lie in
their tables, as TorchRec requires (the ONNX graph maps out-of-range ids to row 0).

Example::

    model = load_torchrec_model("demo/dlrm.int4_qat")
    logits = model(dense, kjt)          # equals ONNX Runtime's logits within 1e-5
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.errors import ArtifactError
from compress.io.dlrm_classes.base import DENSE_ROOTS, set_ebc
from compress.io.model import build_model
from compress.io.model_spec import TableSpec
from compress.methods import registry
from compress.methods.combined import CombinedEmbeddingBagCollection
from compress.methods.qat_embedding import QuantizedEmbeddingBagCollection
from compress.methods.qat_linear import ActivationQuantizer, QuantizedLinear
from compress.quant.fbgemm_rowwise import ROW_ALIGNMENT
from exporters.artifacts.manifest_schema import SharedGroupEntry
from exporters.artifacts.read import Artifacts, TableArrays, load_artifacts
from exporters.onnx.from_artifacts import ACT_SCALE, ACT_ZERO_POINT
from exporters.onnx.from_model import linear_from_artifacts, linear_paths
from exporters.runtime.torchrec_ebc import DEFAULT_CHUNK_ROWS, fbgemm_data_type, fbgemm_ebc

log = logging.getLogger(__name__)

#: Where :func:`table_placement` puts a table.
FBGEMM, OURS, SHARED = "fbgemm", "quantized", "shared"


@dataclass(frozen=True)
class Placement:
    """Which module serves each table: ``kind`` is :data:`FBGEMM` (TorchRec's quantized EBC),
    :data:`OURS` (a table FBGEMM cannot hold exactly, served by its method's converted table)
    or :data:`SHARED`; ``reason``
    says why a table is not in FBGEMM's module."""

    kind: str
    reason: str = ""


def table_placement(arts: Artifacts) -> dict[str, Placement]:
    """Where :func:`load_torchrec_model` puts each table of ``arts``, in the model's order."""
    out = {}
    for name, t in arts.tables.items():
        method = registry.get(t.layout)
        if method.shares_arrays:
            out[name] = Placement(SHARED, method.fbgemm_refusal(t))
        elif fbgemm_data_type(t) is not None:
            out[name] = Placement(FBGEMM)
        else:
            out[name] = Placement(OURS, method.fbgemm_refusal(t))
    return out


def load_torchrec_model(
    artifacts: Artifacts | str | Path,
    *,
    row_alignment: int = ROW_ALIGNMENT,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> nn.Module:
    """The TorchRec DLRM of an artifact directory (see the module docstring), in eval mode.

    ``artifacts``: a path (loaded and verified here) or an :class:`~exporters.artifacts.read.Artifacts`.
    Raises :class:`~compress.errors.ArtifactError` for a directory that fails its checks or does
    not describe a DLRM.
    """
    arts = artifacts if isinstance(artifacts, Artifacts) else load_artifacts(artifacts)
    placement = table_placement(arts)
    for name, p in placement.items():
        if p.kind == OURS:
            log.info(
                "%s: table %s stays in QuantizedEmbeddingBagCollection: %s",
                arts.path,
                name,
                p.reason,
            )
    model = build_model(arts.spec, device="meta")
    _check_dense_keys(model, arts)
    for root in DENSE_ROOTS:
        _load_dense(model, root, arts)
    _int8_activation_linears(model, arts)
    ebc = sparse_module(arts, placement, row_alignment=row_alignment, chunk_rows=chunk_rows)
    set_ebc(model, ebc)
    return model.eval()


def sparse_module(
    arts: Artifacts,
    placement: dict[str, Placement],
    *,
    row_alignment: int = ROW_ALIGNMENT,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> nn.Module:
    """The EBC-interface module of every table of ``arts``, placed as ``placement`` says."""
    tables = list(arts.tables.values())
    parts: list[nn.Module] = []
    in_fbgemm = [t for t in tables if placement[t.name].kind == FBGEMM]
    if in_fbgemm:
        parts.append(
            fbgemm_ebc(arts, in_fbgemm, row_alignment=row_alignment, chunk_rows=chunk_rows)
        )
    ours = [t for t in tables if placement[t.name].kind == OURS]
    if ours:
        parts.append(
            QuantizedEmbeddingBagCollection(
                [_table_spec(t) for t in ours],
                {t.name: registry.get(t.layout).converted_from_arrays(t) for t in ours},
            )
        )
    parts += [shared_module(arts, g) for g in arts.parsed.shared_arrays]
    features = list(arts.spec.feature_names)
    if len(parts) == 1 and _output_keys(parts[0]) == features:
        return parts[0]
    return CombinedEmbeddingBagCollection(parts, features)


def _output_keys(part: nn.Module) -> list[str]:
    return [f for cfg in part.embedding_bag_configs() for f in cfg.feature_names]


def _table_spec(t: TableArrays) -> TableSpec:
    return TableSpec(t.name, t.num_embeddings, t.embedding_dim, tuple(t.feature_names))


def shared_module(arts: Artifacts, group: SharedGroupEntry) -> nn.Module:
    """The module of one shared array, made by the method that shares arrays (ROBE-Z: its tables
    in the group's order, the manifest's hash parameters checked against what the seed gives, the
    array dequantized to float32)."""
    return registry.sharing_method().group_module(arts, group)


def dense_state(model: nn.Module, root: str, arts: Artifacts) -> dict[str, torch.Tensor]:
    """The state dict of ``model.<root>`` from the artifacts: linears as dequantized float32
    weights and biases, every other tensor (DCN kernels) as stored, in float32."""
    paths = {p for layer in linear_paths(arts.spec).values() for p in layer}
    state = {}
    for key in getattr(model, root).state_dict():
        full = f"{root}.{key}"
        module_path, _, leaf = full.rpartition(".")
        if module_path in paths and leaf in ("weight", "bias"):
            linear = linear_from_artifacts(arts, module_path)
            value = linear.dequantized() if leaf == "weight" else linear.bias
        elif full in arts.dense:
            value = arts.dense[full]
        else:
            raise ArtifactError(f"{arts.path}: no dense weight {full!r} in the manifest")
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32))
    return state


def _load_dense(model: nn.Module, root: str, arts: Artifacts) -> None:
    sub = getattr(model, root)
    state = dense_state(model, root, arts)
    for key, expected in sub.state_dict().items():
        if tuple(state[key].shape) != tuple(expected.shape):
            raise ArtifactError(
                f"{arts.path}: {root}.{key} has shape {list(state[key].shape)}, the "
                f"{arts.spec.model_class} of the manifest needs {list(expected.shape)}"
            )
    sub.load_state_dict(state, strict=True, assign=True)


def _check_dense_keys(model: nn.Module, arts: Artifacts) -> None:
    """:class:`ArtifactError` naming any ``dense`` entry that is no tensor of the model."""
    paths = [p for layer in linear_paths(arts.spec).values() for p in layer]
    leaves = ("weight", "qweight", "scales", "bias", ACT_SCALE, ACT_ZERO_POINT)
    known = {f"{p}.{leaf}" for p in paths for leaf in leaves}
    known |= {k for k in model.state_dict() if k.split(".")[0] in DENSE_ROOTS}
    extra = sorted(set(arts.dense) - known)
    if extra:
        raise ArtifactError(
            f"{arts.path}: dense entr{'ies' if len(extra) > 1 else 'y'} {extra} belong to no "
            f"tensor of its {arts.spec.model_class}"
        )


def _int8_activation_linears(model: nn.Module, arts: Artifacts) -> None:
    """Replace each linear that ``arts`` stores with INT8 activations by a
    :class:`~compress.methods.qat_linear.QuantizedLinear` of its codes, scales, bias and input
    quantizer (what the ONNX graph computes)."""
    for path in (p for layer in linear_paths(arts.spec).values() for p in layer):
        stored = linear_from_artifacts(arts, path)
        if not stored.int8_activations:
            continue
        try:
            stored.validate(path)
        except ValueError as e:
            raise ArtifactError(f"{arts.path}: {e}") from None
        quant = ActivationQuantizer()
        quant.scale.fill_(float(stored.act_scale))
        quant.zero_point.fill_(float(stored.act_zero_point))
        layer = QuantizedLinear(
            torch.from_numpy(np.array(stored.qweight)),
            torch.from_numpy(np.array(stored.scales)),
            torch.from_numpy(np.array(stored.bias)),
            stored.bits,
            quant,
        )
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if isinstance(parent, nn.Sequential | nn.ModuleList):
            parent[int(attr)] = layer
        else:
            setattr(parent, attr, layer)
