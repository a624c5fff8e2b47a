"""What is in a checkpoint, as a JSON-ready dictionary (the ``inspect`` command's output)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compress.io.dlrm_classes import strategy_for
from compress.io.dlrm_classes.base import EBC_PREFIX
from compress.io.model_spec import DLRMSpec

if TYPE_CHECKING:  # a Checkpoint is given, never built here (format_bytes needs no torch)
    from compress.io.checkpoint import Checkpoint


def checkpoint_summary(ckpt: Checkpoint, spec: DLRMSpec) -> dict:
    """Model class, tables, dense layers and byte counts of ``ckpt`` (shapes only, no data read).

    Keys: ``checkpoint``, ``format``, ``model``, ``tables`` (``name``, ``feature_names``,
    ``num_embeddings``, ``embedding_dim``, ``dtype``, ``bytes``), ``dense_layers`` (``name``,
    ``shape``, ``bytes``), ``interaction``, ``embedding_bytes``, ``dense_bytes``, ``total_bytes``.
    """
    return {
        "checkpoint": str(ckpt.path),
        "format": ckpt.format,
        "model": spec.model_class,
        "key_prefix": spec.key_prefix,
        "dense_in_features": spec.dense_in_features,
        "num_sparse_features": spec.num_sparse_features,
        "tables": [
            {
                "name": t.name,
                "feature_names": list(t.feature_names),
                "num_embeddings": t.num_embeddings,
                "embedding_dim": t.embedding_dim,
                "dtype": t.dtype,
                "bytes": t.bytes,
            }
            for t in spec.tables
        ],
        "dense_arch_layer_sizes": list(spec.dense_arch_layer_sizes),
        "over_arch_layer_sizes": list(spec.over_arch_layer_sizes),
        "interaction": strategy_for(spec.model_class).interaction_summary(spec),
        "dense_layers": dense_layers(ckpt, spec),
        "embedding_bytes": spec.embedding_bytes,
        "dense_bytes": spec.dense_bytes,
        "total_bytes": spec.total_bytes,
    }


def dense_layers(ckpt: Checkpoint, spec: DLRMSpec) -> list[dict]:
    """Every non-embedding parameter tensor: name (without the key prefix), shape, bytes."""
    out = []
    for key, t in ckpt.tensors.items():
        name = key[len(spec.key_prefix) :]
        if name.startswith(EBC_PREFIX):
            continue
        out.append({"name": name, "shape": list(t.shape), "bytes": t.numel() * t.element_size()})
    return out


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
