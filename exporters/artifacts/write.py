"""The artifact directory: packed tables, dense weights, manifest with checksums; written atomically.

Layout (format version 3)::

    out/
      manifest.json            everything needed to read the rest, sha256 of every file, the dense
                               transform the data was read with, and the sha256 of its own
                               canonical content (schema: exporters.artifacts.manifest_schema)
      tables/<table>.npy       the stored arrays of a table, as its method (the manifest's
      tables/<table>.<role>.npy  ``layout``, compress.methods.registry) converts it: role
                               ``data`` (fp32/fp16 values or packed integer codes), then
                               ``scale``, ``bias``, ... (compress.methods.keep, fp16, rowwise,
                               tablewise)
      shared/<group>.npy       a parameter-sharing (ROBE-Z) array: float32/float16/int8 [M], and
      shared/<group>.scale.npy its int8 scale; its tables store no file of their own and name the
                               group and their row offset O_t, the group its block size Z and hash
                               constants (R1, R2, R3, P) (compress.methods.robe.method)
      dense/<key>.npy          every non-embedding tensor of the model's state dict; a quantized
                               linear stores ``qweight`` at its width (int8 [out, in] at INT8;
                               uint8 [out, ceil(in/2)] packed codes q + 8 at INT4), ``scales`` float32
                               [out] and ``bias`` float32 [out]
      train_log.jsonl          one line per fine-tuning evaluation: step, loss, metrics
      report_data.json         what the report draws beyond the manifest (compress.report_data)
      recipe.toml              the recipe a size budget chose (--budget), to repeat it with
                               --recipe (only then; the manifest's ``budget`` says how)
      report.html              the report, when an extra writer adds it (exporters.report)
      model.onnx, dense_arch.onnx, over_arch.onnx, onnx/parity/
                               the ONNX graphs and their parity data, when an extra writer adds
                               them (exporters.onnx.writer: the graphs read tables/, shared/ and
                               dense/ in place through ONNX external data)

Every array is a ``.npy`` file (no pickle; ``numpy.load(..., mmap_mode="r")`` maps it); the files
of ``tables/``, ``shared/`` and ``dense/`` have their payload at byte 4096
(compress.io.npy_aligned), where the graphs point. The
directory is built under a temporary name beside ``out`` and swapped in when complete, holding a
lock on ``out`` (:mod:`exporters.artifacts.atomic_dir`), so a failure, Ctrl-C or kill leaves either the old
or the new directory and nothing partial once the next run on ``out`` has tidied up. No timestamps
are recorded: the same inputs and seed give byte-identical artifacts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress import __version__
from compress.data.dense_transform import FORMULAS
from compress.errors import ArtifactError
from compress.io.architecture import spec_to_model_config
from compress.io.dlrm_classes.base import SPARSE_ARCH
from compress.io.fingerprint import sha256_file
from compress.io.npy_aligned import aligned_npy_header, save_npy_aligned
from compress.io.staged_arrays import StagedArray, move_or_copy, staged_array_of
from compress.io.table_stream import row_chunks
from compress.methods import registry
from compress.methods.apply_plan import embedding_parts
from compress.methods.base import ConvertedTable, MethodFields
from compress.methods.qat_embedding import QuantizedEmbeddingBagCollection
from compress.methods.qat_linear import QuantizedLinear, mlp_linears
from compress.pipeline import CompressionResult
from compress.quant.packing import pack_nbit
from compress.recipe.toml_out import recipe_to_toml
from compress.report_format import REPORT_DATA_FILE
from exporters.artifacts import atomic_dir
from exporters.artifacts.manifest_integrity import dump_manifest, seal
from exporters.artifacts.manifest_schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    UNKNOWN_TRANSFORM,
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
        known: dict[str, KnownFile] = {}  # files hashed as they were written
        manifest = _write_contents(result, stage, known)
        for writer in extra_writers:
            writer(stage, manifest)
        manifest["files"] = checksums(stage, known)
        _write_json(stage / MANIFEST, manifest)
        atomic_dir.swap_in(stage, out_dir)
    return WrittenArtifacts(out_dir, manifest)


def _write_contents(result: CompressionResult, stage: Path, known: dict[str, KnownFile]) -> dict:
    model = result.model
    (stage / "tables").mkdir()
    (stage / "dense").mkdir()
    converted: dict[str, ConvertedTable] = {}
    group_modules = {id(g.module) for g in result.shared}
    for part in embedding_parts(model):
        if isinstance(part, QuantizedEmbeddingBagCollection):
            converted.update(part.quantized)
        elif id(part) not in group_modules:
            raise ArtifactError(
                f"cannot export embedding module {type(part).__name__}: not converted"
            )

    def save(rel: str, tensor: torch.Tensor) -> str:
        return _save_npy(stage, rel, tensor, aligned=True)  # the full graph reads them in place

    shared = [registry.get(g.method).write_group(g, save) for g in result.shared]
    group_of = {t: g for g in result.shared for t in g.tables}
    tables = []
    for t in result.spec.tables:
        planned = result.plan.table(t.name)
        if t.name in converted:
            entry = _write_table(stage, converted[t.name], known)
        else:
            group = group_of[t.name]
            method = registry.get(group.method)
            entry = table_entry(
                t.name,
                t.num_embeddings,
                t.embedding_dim,
                method.name,
                method.fields(planned.config),
                files={},
                nbytes=planned.bytes_after,  # this table's share of its group's array
                extra=method.group_entry_fields(group, t.name),
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
    if result.report_data is not None:
        text = json.dumps(result.report_data, sort_keys=True, separators=(",", ":"))
        (stage / REPORT_DATA_FILE).write_text(text + "\n", encoding="utf-8")
    if result.budget is not None:  # a budget's choice: the recipe that repeats it with --recipe
        (stage / result.budget["recipe_file"]).write_text(
            recipe_to_toml(result.recipe), encoding="utf-8"
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
        # only with --max-auc-drop: the manifests of runs without a gate stay as they were
        **({} if result.quality_gate is None else {"quality_gate": result.quality_gate}),
        # only when a budget chose the recipe (--budget): other manifests stay as they were
        **({} if result.budget is None else {"budget": result.budget}),
    }


def _write_table(stage: Path, table: ConvertedTable, known: dict[str, KnownFile]) -> dict:
    """Save a converted table's arrays (role ``data`` as ``tables/<t>.npy``, any other as
    ``tables/<t>.<role>.npy``) and return its manifest entry. An array that is a staged file
    (converted straight into a file, :mod:`compress.io.staged_arrays`) is moved into place, not
    written again, its sha256 the one taken while it was written (recorded in ``known``)."""
    files = {}
    for role, array in table.arrays().items():
        suffix = "" if role == "data" else f".{role}"
        rel = f"tables/{table.name}{suffix}.npy"
        staged = staged_array_of(array)
        if staged is not None and _place_staged(stage, rel, staged, known):
            files[role] = rel
        else:
            files[role] = _save_npy(stage, rel, array, aligned=True)
    method = registry.for_config(table.config)
    return table_entry(
        table.name,
        table.num_embeddings,
        table.embedding_dim,
        method.name,
        method.fields(table.config),
        files,
        table.nbytes,
    )


def table_entry(
    name: str,
    rows: int,
    dim: int,
    layout: str,
    fields: MethodFields,
    files: dict[str, str],
    nbytes: int,
    extra: dict | None = None,
) -> dict:
    """A ``tables[i]`` entry: shape, what the method reports (``method``, ``bits``,
    ``granularity``), ``layout`` (the method's registered name), its fields, files and bytes."""
    return {
        "name": name,
        "num_embeddings": rows,
        "embedding_dim": dim,
        "method": fields.method,
        "bits": fields.bits,
        "granularity": fields.granularity,
        "layout": layout,
        **(extra or {}),
        "files": files,
        "bytes": nbytes,
    }


def _write_dense(stage: Path, model: torch.nn.Module) -> list[dict]:
    quantized = {name: m for name, m in mlp_linears(model) if isinstance(m, QuantizedLinear)}
    entries = []
    for key, tensor in model.state_dict().items():
        if key.startswith(SPARSE_ARCH + "."):
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
        # payload at byte 4096, as the tables': the graphs read float weights in place
        entry["file"] = _save_npy(stage, f"dense/{key}.npy", stored, aligned=True)
        entries.append(entry)
    return entries


def pack_int4_weight(qweight: torch.Tensor) -> torch.Tensor:
    """INT4 weights int8 ``[out, in]`` -> uint8 ``[out, ceil(in/2)]`` packed codes ``q + 8``, low
    nibble first; an odd ``in`` is padded with one zero nibble per row."""
    codes = (qweight.to(torch.int16) + 8).to(torch.uint8)
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return pack_nbit(codes, 4)


@dataclass(frozen=True)
class KnownFile:
    """A file of the stage whose sha256 was taken as it was written, and the identity of the file
    then (inode, device, size, modification and status-change times): :func:`checksums` trusts
    the hash only while the file is still that one (a write that sets the modification time back
    still changes the status-change time)."""

    sha256: str
    identity: tuple[int, int, int, int, int]


def _identity(path: Path) -> tuple[int, int, int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _place_staged(stage: Path, rel: str, staged: StagedArray, known: dict[str, KnownFile]) -> bool:
    """Move (or, across file systems, copy) the staged file to ``stage/rel`` and record its hash;
    ``False`` when the staged file is gone or changed, e.g. moved by an earlier export of the same
    model (the caller writes the array instead)."""
    dest = stage / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        digest = move_or_copy(staged, dest)
    except ValueError:
        dest.unlink(missing_ok=True)
        return False
    known[rel] = KnownFile(digest, _identity(dest))
    return True


def _save_npy(stage: Path, rel: str, tensor: torch.Tensor, aligned: bool = False) -> str:
    """Write ``tensor`` as ``stage/rel``; ``aligned``: payload at byte 4096
    (:mod:`compress.io.npy_aligned`), as the files the full ONNX graph reads in place, written
    chunk by chunk (:func:`compress.io.table_stream.row_chunks`: a memory-mapped table, a kept
    one of the checkpoint, is read from its file without mapping its pages)."""
    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
    tensor = tensor.detach()
    with open(stage / rel, "wb") as f:
        if aligned and tensor.dim() > 0:
            header = aligned_npy_header(tensor.numpy().dtype, tuple(tensor.shape))
            _write_all(f, header)
            for _, _, rows in row_chunks(tensor):
                flat = rows.contiguous().numpy().reshape(-1).view(np.uint8)
                _write_all(f, memoryview(flat))
        elif aligned:
            save_npy_aligned(atomic_dir.PlainWriter(f), tensor.contiguous().numpy())
        else:
            np.save(atomic_dir.PlainWriter(f), tensor.contiguous().numpy(), allow_pickle=False)
    return rel


def _write_all(f, data: bytes | memoryview) -> None:
    written = f.write(data)
    if written is not None and written != len(data):
        raise OSError(f"short write: {written} of {len(data)} bytes")


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


def checksums(root: Path, known: dict[str, KnownFile] | None = None) -> dict[str, dict]:
    """``{relative path: {"sha256", "bytes"}}`` for every file under ``root`` but the manifest;
    a file of ``known`` that is still the file it was is not read again."""
    out = {}
    known = known or {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        hashed = known.get(rel)
        if hashed is not None and hashed.identity == _identity(path):
            digest = hashed.sha256
        else:
            digest = sha256_file(path)
        out[rel] = {"sha256": digest, "bytes": path.stat().st_size}
    return out
