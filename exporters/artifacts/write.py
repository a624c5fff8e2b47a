"""The artifact directory: packed tables, dense weights, manifest with checksums; written atomically.

Layout (format version 2)::

    out/
      manifest.json            everything needed to read the rest, sha256 of every file, the dense
                               transform the data was read with, and the sha256 of its own
                               canonical content (schema and checks: exporters.artifacts.manifest)
      tables/<table>.npy       row-wise: uint8 [R, D*bits/8] packed codes (FBGEMM order, low bits
                               first); table-wise: uint8 [R, D*bits/8] packed codes q + 2^(bits-1);
                               fp16: float16 [R, D]; keep: float32 [R, D]
      tables/<table>.scale.npy row-wise: float16 [R]; table-wise: float32 [] (one scale)
      tables/<table>.bias.npy  row-wise: float16 [R]
      shared/<group>.npy       a parameter-sharing (ROBE-Z) array: float32/float16/int8 [M]; its
                               tables have layout "robe" and name the group, their row offset O_t,
                               block size Z and hash constants (R1, R2, R3, P) in the manifest
      shared/<group>.scale.npy int8 arrays: float32 [1] (value = q * scale)
      dense/<key>.npy          every non-embedding tensor of the model's state dict; a quantized
                               linear stores ``qweight`` at its width (int8 [out, in] at INT8;
                               uint8 [out, ceil(in/2)] packed codes q + 8 at INT4), ``scales`` float32
                               [out] and ``bias`` float32 [out]
      train_log.jsonl          one line per fine-tuning evaluation: step, loss, metrics

Every array is a ``.npy`` file (no pickle; ``numpy.load(..., mmap_mode="r")`` maps it). The
directory is built under a temporary name beside ``out`` and swapped in when complete, holding a
lock on ``out`` (:mod:`exporters.artifacts.atomic_dir`), so a failure, Ctrl-C or kill leaves either the old
or the new directory and nothing partial once the next run on ``out`` has tidied up. No timestamps
are recorded: the same inputs and seed give byte-identical artifacts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress import __version__
from compress.data.dense_transform import FORMULAS
from compress.errors import ArtifactError
from compress.io.architecture import spec_to_model_config
from compress.methods.apply_plan import embedding_parts
from compress.methods.qat_embedding import QuantizedEmbeddingBagCollection, QuantizedTable
from compress.methods.qat_linear import QuantizedLinear, mlp_linears
from compress.methods.robe import RobeEmbeddingBagCollection, quantize_array, table_offsets
from compress.methods.robe_hash import ROBE_PRIME
from compress.pipeline import CompressionResult
from compress.quant import math as qm
from compress.recipe.parse import recipe_to_toml
from exporters.artifacts import atomic_dir
from exporters.artifacts.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    UNKNOWN_TRANSFORM,
    dump_manifest,
    seal,
    sha256_file,
)

Writer = Callable[[Path, dict], None]  # extra step: (staging directory, manifest) -> None


@dataclass(frozen=True)
class WrittenArtifacts:
    path: Path
    manifest: dict


def save(
    result: CompressionResult,
    out_dir: str | Path,
    *,
    force: bool = False,
    extra_writers: tuple[Writer, ...] = (),
) -> WrittenArtifacts:
    """Write ``result`` as an artifact directory at ``out_dir`` (atomically; see module docstring).

    ``extra_writers`` add files (e.g. ONNX graphs) into the staging directory and may record them
    in the manifest before checksums are taken. An existing ``out_dir`` is an error unless ``force``.
    """
    out_dir = Path(out_dir)
    with atomic_dir.output_lock(out_dir):  # re-entrant: the CLI holds it from its start
        atomic_dir.recover(out_dir)
        if out_dir.exists() and not force:
            raise ArtifactError(f"{out_dir}: already exists (use --force to replace it)")
        return _save_staged(result, out_dir, extra_writers)


def _save_staged(
    result: CompressionResult, out_dir: Path, extra_writers: tuple[Writer, ...]
) -> WrittenArtifacts:
    """Build the directory in a stage beside ``out_dir`` and swap it in (exporters.artifacts.atomic_dir);
    an OS error (full disk, permissions) is one ArtifactError naming the path, stage removed."""
    with atomic_dir.staging(out_dir) as stage:
        manifest = _write_contents(result, stage)
        for writer in extra_writers:
            writer(stage, manifest)
        manifest["files"] = checksums(stage)
        _write_json(stage / MANIFEST, manifest)
        atomic_dir.swap_in(stage, out_dir)
    return WrittenArtifacts(out_dir, manifest)


def _write_contents(result: CompressionResult, stage: Path) -> dict:
    model = result.model
    (stage / "tables").mkdir()
    (stage / "dense").mkdir()
    quantized: dict[str, QuantizedTable] = {}
    robe_modules: dict[str, RobeEmbeddingBagCollection] = {}
    for part in embedding_parts(model):
        if isinstance(part, QuantizedEmbeddingBagCollection):
            quantized.update(part.quantized)
        elif isinstance(part, RobeEmbeddingBagCollection):
            robe_modules.update({t.name: part for t in part.tables})
        else:
            raise ArtifactError(
                f"cannot export embedding module {type(part).__name__}: not converted"
            )
    shared = [_write_shared(stage, g.name, g.module, g.projection) for g in result.shared]
    group_of = {t: g for g in shared for t in g["tables"]}
    tables = []
    for t in result.spec.tables:
        planned = result.plan.table(t.name)
        if t.name in quantized:
            entry = _write_table(stage, quantized[t.name])
        else:
            entry = _robe_table_entry(
                t, robe_modules[t.name], group_of[t.name], planned.bytes_after
            )
        entry.update(
            {
                "feature_names": list(t.feature_names),
                "rule": planned.rule_index,
                "bytes_planned": planned.bytes_after,
            }
        )
        tables.append(entry)
    dense = _write_dense(stage, model)
    if result.train is not None:
        with open(stage / "train_log.jsonl", "w") as f:
            for entry in result.train.history:  # timings left out: artifacts must be reproducible
                f.write(
                    json.dumps({k: v for k, v in entry.items() if k != "samples_per_second"}) + "\n"
                )
    spec = result.spec
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool": "dqrm-compress",
        "tool_version": __version__,
        "source": {"checkpoint": Path(result.source).name, "data": result.data},
        "model": {
            **spec_to_model_config(spec),
            "dense_arch_layer_sizes": list(spec.dense_arch_layer_sizes),
            "over_arch_layer_sizes": list(spec.over_arch_layer_sizes),
            "dcn_num_layers": spec.dcn_num_layers,
            "dcn_low_rank_dim": spec.dcn_low_rank_dim,
            "interaction_branch1_layer_sizes": _opt_list(spec.interaction_branch1_layer_sizes),
            "interaction_branch2_layer_sizes": _opt_list(spec.interaction_branch2_layer_sizes),
            "feature_names": list(spec.feature_names),
        },
        "inputs": {
            "dense": {
                "dtype": "float32",
                "shape": ["batch", spec.dense_in_features],
                "transform": dense_transform_record(result.dense_transform),
            },
            "sparse": {
                f: {"table": spec.table_of_feature(f).name, "dtype": "int64", "jagged": True}
                for f in spec.feature_names
            },
        },
        "recipe": {"name": result.recipe.name, "toml": recipe_to_toml(result.recipe)},
        "plan": {k: v for k, v in result.plan.to_json().items() if k != "tables"},
        "tables": tables,
        "shared_arrays": shared,
        "dense": dense,
        "bytes": {
            "tables": sum(t["bytes"] for t in tables),
            "dense": sum(d["bytes"] for d in dense),
        },
        "metrics": result.metrics,
        "notes": result.notes,
        "train": None
        if result.train is None
        else {
            "steps": result.train.steps,
            "best_step": result.train.best_step,
            "selected_on": result.train.selected_on,
            # no resumed_from: a resumed run's artifacts are byte-identical to an uninterrupted one
        },
    }


def _write_table(stage: Path, table: QuantizedTable) -> dict:
    quant = table.quant
    files = {"data": _save_npy(stage, f"tables/{table.name}.npy", table.data)}
    if table.scale is not None:
        files["scale"] = _save_npy(stage, f"tables/{table.name}.scale.npy", table.scale)
    if table.bias is not None:
        files["bias"] = _save_npy(stage, f"tables/{table.name}.bias.npy", table.bias)
    return {
        "name": table.name,
        "num_embeddings": table.num_embeddings,
        "embedding_dim": table.embedding_dim,
        "method": quant.method,
        "bits": quant.bits,
        "granularity": quant.granularity,
        "layout": table_layout(quant.method, quant.granularity),
        "files": files,
        "bytes": table.nbytes,
    }


def _write_shared(
    stage: Path, name: str, module: RobeEmbeddingBagCollection, projection: str
) -> dict:
    (stage / "shared").mkdir(exist_ok=True)
    quant = module.quantization
    if quant is not None and quant.group_size is not None:
        raise ArtifactError(
            f"shared array {name}: int8 with a scale per {quant.group_size} cells cannot be "
            "exported yet (the artifact format holds one scale per array)"
        )
    precision = quant.precision if quant is not None else "fp32"
    data, scale = quantize_array(module.weight.detach(), precision)
    files = {"data": _save_npy(stage, f"shared/{name}.npy", data)}
    if scale is not None:
        files["scale"] = _save_npy(stage, f"shared/{name}.scale.npy", scale)
    constants = module.config.constants
    return {
        "name": name,
        "tables": [t.name for t in module.tables],
        "cells": module.config.array_size,
        "block_size": module.config.block_size,
        "seed": module.config.seed,
        "constants": [constants.r1, constants.r2, constants.r3],
        "prime": ROBE_PRIME,
        "dtype": precision,
        "projection": projection,
        "files": files,
        "bytes": data.numel() * data.element_size()
        + (scale.numel() * 4 if scale is not None else 0),
    }


def _robe_table_entry(
    t, module: RobeEmbeddingBagCollection, group: dict, planned_bytes: int
) -> dict:
    offsets = dict(zip([x.name for x in module.tables], table_offsets(module.tables), strict=True))
    return {
        "name": t.name,
        "num_embeddings": t.num_embeddings,
        "embedding_dim": t.embedding_dim,
        "method": "share",
        "bits": None,
        "granularity": None,
        "layout": "robe",
        "group": group["name"],
        "table_offset": offsets[t.name],
        "files": {},
        "bytes": planned_bytes,  # this table's share of its group's array (the plan's split)
    }


def table_layout(method: str, granularity: str | None) -> str:
    """The manifest's name for how a table's files are laid out."""
    if method == "keep":
        return "fp32"
    if method == "fp16":
        return "fp16"
    return "rowwise" if granularity == "row" else "tablewise"


def _write_dense(stage: Path, model: torch.nn.Module) -> list[dict]:
    quantized = {name: m for name, m in mlp_linears(model) if isinstance(m, QuantizedLinear)}
    entries = []
    for key, tensor in model.state_dict().items():
        if key.startswith("sparse_arch."):
            continue
        module_name, _, leaf = key.rpartition(".")
        q = quantized.get(module_name)
        entry = {"key": key, "shape": list(tensor.shape)}
        if q is not None and leaf == "qweight":
            stored = tensor if q.bits == 8 else pack_int4_weight(tensor)
            entry.update(
                {"bits": q.bits, "layout": "int8" if q.bits == 8 else "int4_offset_packed"}
            )
            entry["bytes"] = stored.numel() * stored.element_size()
        else:
            stored = tensor
            entry["bytes"] = tensor.numel() * tensor.element_size()
        entry["file"] = _save_npy(stage, f"dense/{key}.npy", stored)
        entries.append(entry)
    return entries


def pack_int4_weight(qweight: torch.Tensor) -> torch.Tensor:
    """INT4 weights int8 ``[out, in]`` -> uint8 ``[out, ceil(in/2)]`` packed codes ``q + 8``, low
    nibble first; an odd ``in`` is padded with one zero nibble per row."""
    codes = (qweight.to(torch.int16) + 8).to(torch.uint8)
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return qm.pack_nbit(codes, 4)


def _save_npy(stage: Path, rel: str, tensor: torch.Tensor) -> str:
    with open(stage / rel, "wb") as f:
        np.save(atomic_dir.PlainWriter(f), tensor.detach().contiguous().numpy(), allow_pickle=False)
    return rel


def _opt_list(x) -> list | None:
    return list(x) if x is not None else None


def _write_json(path: Path, obj: dict) -> None:
    """Write the manifest sealed with its digest, in the one spelling readers accept."""
    path.write_text(dump_manifest(seal(obj)), encoding="utf-8")


def dense_transform_record(name: str | None) -> dict:
    """``inputs.dense.transform``: the transform the data was read with and its formula
    (:mod:`compress.data.dense_transform`), or ``unknown`` when no data was read."""
    if name is None:
        return {"name": UNKNOWN_TRANSFORM, "formula": None}
    return {"name": name, "formula": FORMULAS[name]}


def checksums(root: Path) -> dict[str, dict]:
    """``{relative path: {"sha256", "bytes"}}`` for every file under ``root`` but the manifest."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out
