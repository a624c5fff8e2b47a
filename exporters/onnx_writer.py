"""Write the ONNX graphs into an artifact directory, with a parity proof against PyTorch.

:func:`onnx_writer` makes an ``extra_writers`` step for :func:`exporters.artifacts.save`. Run in the
staging directory after the tables and dense weights are written, it

1. reads those files back (memory-mapped) and describes them as a graph spec
   (:func:`exporters.graph_spec.graph_spec_from_artifacts`), so the graphs hold exactly the stored
   arrays;
2. writes ``onnx/model.onnx`` (dense + jagged sparse inputs -> logits; tables of 256 MiB or more
   go to ``onnx/model.onnx.data`` beside it), ``onnx/dense_arch.onnx`` and ``onnx/over_arch.onnx``
   (each passes ``onnx.checker``);
3. runs ONNX Runtime (with the session settings it is served with,
   :data:`~exporters.predictor.SERVING_SESSION_CONFIG`) on a few hundred sampled inputs (one id a bag from
   :func:`compress.distill.sample_inputs`, plus multi-hot bags of 0..3 ids from
   :func:`sample_multihot`) against the PyTorch converted model and raises
   :class:`~exporters.onnx_validate.ParityError` above ``atol`` (1e-5), which aborts the atomic
   write: no artifact directory is left behind with graphs that compute something else;
4. records the ``onnx`` section of the manifest (:func:`onnx_section`).

Example::

    artifacts.save(result, out_dir, extra_writers=(onnx_writer(result.model),))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from compress.dataset import Dataset
from compress.distill import sample_inputs
from compress.spec import DLRMSpec
from exporters.artifacts import Writer
from exporters.graph_spec import graph_spec_from_artifacts
from exporters.load import artifacts_from_manifest
from exporters.onnx_lookup import Pooling, RowwiseImpl
from exporters.onnx_model import (
    DEFAULT_EXTERNAL_DATA_THRESHOLD,
    LOGITS,
    TensorDecl,
    build_dense_graph,
    build_over_graph,
    dense_graph_io,
    export_full_model,
    external_data_location,
    feature_input_names,
    full_model_io,
    over_graph_io,
    save_model,
)
from exporters.onnx_spec import IR_VERSION, DLRMGraphSpec
from exporters.onnx_validate import compare_outputs, run_session
from exporters.predictor import SERVING_SESSION_CONFIG, dataset_feeds, serving_session

ONNX_DIR = "onnx"
GRAPH_FILES = {
    "model": f"{ONNX_DIR}/model.onnx",
    "dense_arch": f"{ONNX_DIR}/dense_arch.onnx",
    "over_arch": f"{ONNX_DIR}/over_arch.onnx",
}
PARITY_ATOL = 1e-5


@dataclass(frozen=True)
class OnnxExportConfig:
    """How the graphs are built and checked.

    ``parity_samples`` inputs of each kind (one-hot and multi-hot) are scored; ``atol`` is the
    largest absolute logit difference accepted. ``one_hot_features``: features the data shows
    one-hot, looked up apart from the others (a layout hint,
    :attr:`~exporters.onnx_spec.DLRMGraphSpec.one_hot_features`); the multi-hot parity samples
    break it on purpose, so the proof covers batches that do not agree with it too.
    """

    parity_samples: int = 256
    seed: int = 0
    atol: float = PARITY_ATOL
    max_bag: int = 3
    external_data_threshold_bytes: int | None = DEFAULT_EXTERNAL_DATA_THRESHOLD
    rowwise_impl: RowwiseImpl = "auto"
    pooling: Pooling = "cumsum"
    threads: int | None = None
    one_hot_features: tuple[str, ...] = ()


def onnx_writer(reference: nn.Module, config: OnnxExportConfig | None = None) -> Writer:
    """An ``extra_writers`` step for :func:`exporters.artifacts.save` that proves parity against
    ``reference``, the converted PyTorch model the artifacts were written from."""
    cfg = config or OnnxExportConfig()

    def write_onnx(stage: Path, manifest: dict) -> None:
        manifest["onnx"] = export_onnx(stage, manifest, reference, cfg)

    return write_onnx


def export_onnx(root: Path, manifest: dict, reference: nn.Module, config: OnnxExportConfig) -> dict:
    """Write the three graphs under ``root/onnx`` from the arrays under ``root``; check parity;
    return the manifest's ``onnx`` section."""
    root = Path(root)
    arts = artifacts_from_manifest(root, manifest)
    gspec = graph_spec_from_artifacts(arts)
    unknown = sorted(set(config.one_hot_features) - set(gspec.features))
    if unknown:
        raise ValueError(f"one_hot_features names unknown features: {', '.join(unknown)}")
    gspec = replace(gspec, one_hot_features=frozenset(config.one_hot_features))
    (root / ONNX_DIR).mkdir(exist_ok=True)
    paths = {name: root / rel for name, rel in GRAPH_FILES.items()}
    export_full_model(
        gspec,
        paths["model"],
        config.external_data_threshold_bytes,
        config.rowwise_impl,
        config.pooling,
    )
    save_model(build_dense_graph(gspec), paths["dense_arch"], config.external_data_threshold_bytes)
    save_model(build_over_graph(gspec), paths["over_arch"], config.external_data_threshold_bytes)
    parity = check_parity(reference, arts.spec, gspec, paths, config)
    return onnx_section(root, gspec, config, parity)


# ---------------------------------------------------------------------------------------------
# Parity


def sample_multihot(spec: DLRMSpec, n: int, seed: int, max_bag: int = 3) -> Dataset:
    """``n`` unlabelled inputs: standard normal dense, every bag 0..``max_bag`` uniform ids."""
    rng = np.random.default_rng([seed, 0x4D48])
    dense = rng.standard_normal((n, spec.dense_in_features), dtype=np.float32)
    values, offsets = {}, {}
    for f in spec.feature_names:
        lengths = rng.integers(0, max_bag + 1, n)
        offsets[f] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values[f] = rng.integers(0, spec.table_of_feature(f).num_embeddings, int(offsets[f][-1]))
    return Dataset(dense=dense, labels=np.zeros(n, np.float32), values=values, offsets=offsets)


@torch.no_grad()
def reference_outputs(model: nn.Module, dataset: Dataset, spec: DLRMSpec) -> dict[str, np.ndarray]:
    """What each graph must compute, from the PyTorch model: logits ``[N, 1]``, the dense arch's
    output ``[N, D]`` and the pooled sparse embeddings ``[N, F, D]`` (the over graph's inputs)."""
    model.eval()
    batch = dataset.to_batch(spec.feature_names)
    dense_embedding = model.dense_arch(batch.dense)
    sparse_embedding = model.sparse_arch(batch.sparse)
    over = model.over_arch(model.inter_arch(dense_embedding, sparse_embedding))
    return {
        "logits": model(batch.dense, batch.sparse).reshape(-1, 1).numpy(),
        "over_logits": over.reshape(-1, 1).numpy(),
        "dense_embedding": dense_embedding.numpy(),
        "sparse_embedding": sparse_embedding.numpy(),
    }


def check_parity(
    reference: nn.Module,
    spec: DLRMSpec,
    gspec: DLRMGraphSpec,
    paths: dict[str, Path],
    config: OnnxExportConfig,
) -> dict:
    """Score both sample sets with ORT and PyTorch; raise ParityError above ``config.atol``."""
    sessions = {name: serving_session(p, threads=config.threads) for name, p in paths.items()}
    inputs = feature_input_names(gspec)
    sets = {
        "one_hot": sample_inputs(spec, config.parity_samples, config.seed),
        "multi_hot": sample_multihot(spec, config.parity_samples, config.seed, config.max_bag),
    }
    worst = {"model": 0.0, "dense_arch": 0.0, "over_arch": 0.0}
    for set_name, data in sets.items():
        ref = reference_outputs(reference, data, spec)
        got = run_session(sessions["model"], dataset_feeds(data, inputs))[LOGITS]
        checks = {
            "model": compare_outputs(
                ref["logits"], got, config.atol, f"model.onnx logits ({set_name})"
            )
        }
        got = run_session(sessions["dense_arch"], {"dense": data.dense})["dense_embedding"]
        checks["dense_arch"] = compare_outputs(
            ref["dense_embedding"],
            got,
            config.atol,
            f"dense_arch.onnx dense_embedding ({set_name})",
        )
        feeds = {
            "dense_embedding": ref["dense_embedding"],
            "sparse_embedding": ref["sparse_embedding"],
        }
        got = run_session(sessions["over_arch"], feeds)[LOGITS]
        checks["over_arch"] = compare_outputs(
            ref["over_logits"], got, config.atol, f"over_arch.onnx logits ({set_name})"
        )
        for name, result in checks.items():
            worst[name] = max(worst[name], result["max_abs_diff"])
    return {
        "reference": "the PyTorch converted model",
        "runtime": f"onnxruntime {ort.__version__} (CPU)",
        "samples": {k: len(v) for k, v in sets.items()},
        "max_bag": config.max_bag,
        "seed": config.seed,
        "atol": config.atol,
        "max_abs_diff": worst,
    }


# ---------------------------------------------------------------------------------------------
# Manifest section


def _decls(decls: list[TensorDecl]) -> list[dict]:
    return [{"name": d.name, "dtype": d.dtype, "shape": list(d.shape)} for d in decls]


def _graph_entry(root: Path, rel: str, io: tuple[list[TensorDecl], list[TensorDecl]]) -> dict:
    path = root / rel
    data = path.parent / external_data_location(path)
    model = onnx.load(str(path), load_external_data=False)
    return {
        "file": rel,
        "external_data": data.relative_to(root).as_posix() if data.exists() else None,
        "inputs": _decls(io[0]),
        "outputs": _decls(io[1]),
        "opset_imports": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
    }


def onnx_section(root: Path, gspec: DLRMGraphSpec, config: OnnxExportConfig, parity: dict) -> dict:
    """The manifest's ``onnx`` section: files, declared inputs/outputs, versions, ORT settings."""
    graphs = {
        "model": _graph_entry(root, GRAPH_FILES["model"], full_model_io(gspec)),
        "dense_arch": _graph_entry(root, GRAPH_FILES["dense_arch"], dense_graph_io(gspec)),
        "over_arch": _graph_entry(root, GRAPH_FILES["over_arch"], over_graph_io(gspec)),
    }
    graphs["model"]["features"] = {
        f: {"values": v, "lengths": ln} for f, (v, ln) in feature_input_names(gspec).items()
    }
    settings = {
        k: v
        for k, v in asdict(config).items()
        if k in ("rowwise_impl", "pooling", "external_data_threshold_bytes")
    }
    settings["one_hot_features"] = sorted(gspec.one_hot_features)
    return {
        "ir_version": IR_VERSION,
        "opset_imports": graphs["model"]["opset_imports"],
        "session_config": dict(SERVING_SESSION_CONFIG),
        "session_config_note": "set these with SessionOptions.add_session_config_entry (parity was "
        "proven with them); qdq_matmulnbits_accuracy_level=1 (or disable_quant_qdq=1) is required "
        "for exact INT4/INT8 MLP results",
        "graphs": graphs,
        "export": settings,
        "parity": parity,
    }
