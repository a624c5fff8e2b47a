"""Write the ONNX graphs into an artifact directory, with a parity proof against PyTorch.

:func:`onnx_writer` makes an ``extra_writers`` step for :func:`exporters.artifacts.write.save`. Run in the
staging directory after the tables and dense weights are written, it

1. reads those files back (memory-mapped) and describes them as a graph spec
   (:func:`exporters.onnx.from_model.graph_spec_from_artifacts`), so the graphs hold exactly the stored
   arrays;
2. writes ``model.onnx`` at the directory's root (dense + jagged sparse inputs -> logits), whose
   table initializers and float MLP weights point at the ``tables/``, ``shared/`` and ``dense/``
   files through ONNX external data instead of carrying a copy
   (:mod:`exporters.onnx.stored_arrays`; ONNX refuses locations with ``..``, hence the root;
   anything else of 256 MiB or more would go to ``model.onnx.data`` beside it), and the split
   graphs ``dense_arch.onnx`` and ``over_arch.onnx`` beside it, whose float MLP weights are the
   same ``dense/`` files (each graph passes ``onnx.checker``);
3. runs ONNX Runtime, both in a plain ``InferenceSession(path)`` (no session option: the graphs
   must not depend on any) and with the session settings the Predictor serves with
   (:data:`~exporters.onnx.parity.SERVING_SESSION_CONFIG`), on a few hundred sampled inputs of
   each set (one id a bag from :func:`compress.train.distill.sample_inputs`; multi-hot bags of 0..3 ids
   from :func:`sample_multihot`; the same with a quarter of the ids out of range,
   :func:`sample_out_of_range`, against the PyTorch model fed those ids mapped to 0) against the
   PyTorch converted model and raises :class:`~exporters.onnx.parity.ParityError` above
   ``atol`` (the model class's parity tolerance, 1e-5 for every TorchRec DLRM class), which aborts the atomic write: no artifact directory is left behind with
   graphs that compute something else;
4. stores each set's ``model.onnx`` feeds and reference logits as ``.npy`` under
   ``onnx/parity/<set>/`` (checksummed like every file), so that ``dqrm-compress verify
   --parity`` can re-run the check with the serving host's ONNX Runtime
   (:func:`~exporters.onnx.parity.verify_parity`);
5. records the ``onnx`` section of the manifest (:func:`onnx_section`).

Example::

    artifacts.save(result, out_dir, extra_writers=(onnx_writer(result.model),))
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from compress.data.dataset import Dataset
from compress.io.dlrm_classes import strategy_for
from compress.io.model_spec import DLRMSpec
from compress.io.staged_arrays import release_pages, staged_tensors
from compress.timings import StageTimer
from compress.train.distill import sample_inputs
from exporters.artifacts.manifest_schema import (
    PARITY_DIR,  # parity inputs and logits (verify --parity)
)
from exporters.artifacts.read import artifacts_from_manifest
from exporters.artifacts.write import Writer
from exporters.onnx.from_model import graph_spec_from_artifacts
from exporters.onnx.lookup import OUT_OF_RANGE_IDS, POOLING, RowwiseImpl
from exporters.onnx.model import (
    DEFAULT_EXTERNAL_DATA_THRESHOLD,
    LOGITS,
    TensorDecl,
    dense_graph_io,
    export_dense_graph,
    export_full_model,
    export_over_graph,
    external_files,
    feature_input_names,
    full_model_io,
    over_graph_io,
)
from exporters.onnx.parity import (
    SERVING_SESSION_CONFIG,
    compare_outputs,
    plain_session,
    run_session,
    serving_session,
)
from exporters.onnx.parity_ids import with_special_ids
from exporters.onnx.spec import IR_VERSION, DLRMGraphSpec
from exporters.onnx.stored_arrays import stored_arrays
from exporters.runtime.predictor import dataset_feeds

ONNX_DIR = "onnx"
#: At the root: the graphs read tables/, shared/ and dense/ in place (ONNX refuses ``..``). Earlier
#: format 3 directories hold the split graphs as ``onnx/<name>.onnx``, each with its own copy of the
#: MLP weights; readers take every graph's path from the manifest, so both are read.
GRAPH_FILES = {
    "model": "model.onnx",
    "dense_arch": "dense_arch.onnx",
    "over_arch": "over_arch.onnx",
}


@dataclass(frozen=True)
class OnnxExportConfig:
    """How the graphs are built and checked.

    ``parity_samples`` inputs of each kind (one-hot and multi-hot) are scored; ``atol`` is the
    largest absolute logit difference accepted (``None``: the model class's
    :attr:`~compress.io.dlrm_classes.base.DLRMClass.parity_atol`). ``one_hot_features``: features the data shows
    one-hot, looked up apart from the others (a layout hint,
    :attr:`~exporters.onnx.spec.DLRMGraphSpec.one_hot_features`); the multi-hot parity samples
    break it on purpose, so the proof covers batches that do not agree with it too.
    """

    parity_samples: int = 256
    seed: int = 0
    atol: float | None = None
    max_bag: int = 3
    external_data_threshold_bytes: int | None = DEFAULT_EXTERNAL_DATA_THRESHOLD
    rowwise_impl: RowwiseImpl = "auto"
    threads: int | None = None
    one_hot_features: tuple[str, ...] = ()


def onnx_writer(
    reference: nn.Module, config: OnnxExportConfig | None = None, timer: StageTimer | None = None
) -> Writer:
    """An ``extra_writers`` step for :func:`exporters.artifacts.write.save` that proves parity against
    ``reference``, the converted PyTorch model the artifacts were written from (``timer``, when
    given, receives the parity check's seconds as stage ``parity``)."""
    cfg = config or OnnxExportConfig()

    def write_onnx(stage: Path, manifest: dict) -> None:
        manifest["onnx"] = export_onnx(stage, manifest, reference, cfg, timer)

    return write_onnx


def export_onnx(
    root: Path,
    manifest: dict,
    reference: nn.Module,
    config: OnnxExportConfig,
    timer: StageTimer | None = None,
) -> dict:
    """Write the three graphs into ``root`` from the arrays under it (reading them in place);
    check parity; return the manifest's ``onnx`` section."""
    root = Path(root)
    arts = artifacts_from_manifest(root, manifest)
    gspec = graph_spec_from_artifacts(arts)
    unknown = sorted(set(config.one_hot_features) - set(gspec.features))
    if unknown:
        raise ValueError(f"one_hot_features names unknown features: {', '.join(unknown)}")
    gspec = replace(gspec, one_hot_features=frozenset(config.one_hot_features))
    (root / ONNX_DIR).mkdir(exist_ok=True)
    paths = {name: root / rel for name, rel in GRAPH_FILES.items()}
    stored = stored_arrays(arts)
    threshold = config.external_data_threshold_bytes
    export_full_model(gspec, paths["model"], threshold, config.rowwise_impl, stored=stored)
    export_dense_graph(gspec, paths["dense_arch"], threshold, stored=stored)
    export_over_graph(gspec, paths["over_arch"], threshold, stored=stored)
    with timer("parity") if timer is not None else nullcontext():
        parity = check_parity(reference, arts.spec, gspec, root, paths, config)
    return onnx_section(root, gspec, config, parity)


# ---------------------------------------------------------------------------------------------
# Parity


def sample_multihot(spec: DLRMSpec, n: int, seed: int, max_bag: int = 3) -> Dataset:
    """``n`` unlabelled inputs: the model class's dummy inputs
    (:meth:`~compress.io.dlrm_classes.base.DLRMClass.dummy_inputs`; for every TorchRec DLRM class
    standard normal dense and bags of 0..``max_bag`` uniform ids)."""
    return strategy_for(spec.model_class).dummy_inputs(spec, n, seed, max_bag)


def parity_atol(spec: DLRMSpec, config: OnnxExportConfig) -> float:
    """The tolerance of the parity check: ``config.atol``, else the model class's."""
    return config.atol if config.atol is not None else strategy_for(spec.model_class).parity_atol


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


@dataclass(frozen=True)
class ParitySet:
    """The inputs of one parity set: PyTorch scores ``data``; the graphs get the same samples with
    ``graph_ids`` (ids per feature) in place of ``data``'s ids where given."""

    data: Dataset
    graph_ids: dict[str, np.ndarray] | None = None

    def feeds(self, inputs: dict[str, tuple[str, str]]) -> dict[str, np.ndarray]:
        """ORT feeds of the whole set (input names from ``feature_input_names``)."""
        feeds = dataset_feeds(self.data, inputs)
        for f, ids in (self.graph_ids or {}).items():
            feeds[inputs[f][0]] = ids
        return feeds


def sample_out_of_range(spec: DLRMSpec, n: int, seed: int, max_bag: int = 3) -> ParitySet:
    """Multi-hot samples (:func:`sample_multihot`) in which about a quarter of the ids the graphs
    get lie outside their table: -1, the row count (the next table's first row in a stacked
    layout), one past it, and ids far out on both sides. PyTorch (which refuses such ids) gets 0
    in their place: the graphs must serve row 0 of the id's own table
    (:data:`~exporters.onnx.lookup.OUT_OF_RANGE_IDS`)."""
    data = sample_multihot(spec, n, seed + 1, max_bag)
    rng = np.random.default_rng([seed, 0x4F4F52])
    reference, graph_ids = {}, {}
    for f in spec.feature_names:
        ids = np.asarray(data.values[f], np.int64)
        rows = spec.table_of_feature(f).num_embeddings
        bad = np.asarray([-1, rows, rows + 1, -(2**40), 2**40], np.int64)
        pick = rng.random(len(ids)) < 0.25
        graph_ids[f] = ids.copy()
        graph_ids[f][pick] = bad[rng.integers(0, len(bad), int(pick.sum()))]
        reference[f] = np.where(pick, 0, ids)
    data = Dataset(dense=data.dense, labels=data.labels, values=reference, offsets=data.offsets)
    return ParitySet(data, graph_ids)


def parity_sets(spec: DLRMSpec, config: OnnxExportConfig) -> dict[str, ParitySet]:
    """The parity inputs by set name: one-hot, multi-hot, and multi-hot with out-of-range ids."""
    n, seed = config.parity_samples, config.seed
    return {
        "one_hot": ParitySet(sample_inputs(spec, n, seed)),
        "multi_hot": ParitySet(sample_multihot(spec, n, seed, config.max_bag)),
        "out_of_range": sample_out_of_range(spec, n, seed, config.max_bag),
    }


def _write_reference_data(
    root: Path, set_name: str, feeds: dict[str, np.ndarray], logits: np.ndarray
) -> dict:
    """Save one parity set's ORT feeds and reference logits as plain ``.npy`` files under
    ``onnx/parity/<set>/`` (no pickle); returns its manifest entry (relative paths)."""
    folder = f"{PARITY_DIR}/{set_name}"
    (root / folder).mkdir(parents=True, exist_ok=True)
    entry: dict = {"inputs": {}, "logits": f"{folder}/{LOGITS}.npy"}
    for name in sorted(feeds):
        rel = f"{folder}/{name}.npy"
        np.save(root / rel, np.ascontiguousarray(feeds[name]), allow_pickle=False)
        entry["inputs"][name] = rel
    np.save(root / entry["logits"], np.ascontiguousarray(logits, np.float32), allow_pickle=False)
    return entry


#: How the parity check opens each graph: a plain ``InferenceSession(path)`` (no option: the graphs
#: must not depend on any) and the serving session the Predictor uses.
PARITY_SESSIONS = {"plain": plain_session, "serving": serving_session}


def check_parity(
    reference: nn.Module,
    spec: DLRMSpec,
    gspec: DLRMGraphSpec,
    root: Path,
    paths: dict[str, Path],
    config: OnnxExportConfig,
) -> dict:
    """Score every parity set with PyTorch and with ORT in each of :data:`PARITY_SESSIONS`; raise
    :class:`~exporters.onnx.parity.ParityError` above :func:`parity_atol`. The full model's feeds
    and reference logits are stored under ``onnx/parity/`` for ``verify --parity``. One session
    kind is open at a time."""
    inputs = feature_input_names(gspec)
    sets = with_special_ids(parity_sets(spec, config), gspec, config.seed)  # e.g. hot rows
    atol = parity_atol(spec, config)
    cases, stored = {}, {}
    for set_name, pset in sets.items():
        ref = reference_outputs(reference, pset.data, spec)
        feeds = pset.feeds(inputs)
        stored[set_name] = _write_reference_data(root, set_name, feeds, ref["logits"])
        cases[set_name] = (pset.data, ref, feeds)
    # the pages of staged tables PyTorch read, before ONNX Runtime maps the same files
    release_pages(staged_tensors(reference))
    worst = {"model": 0.0, "dense_arch": 0.0, "over_arch": 0.0}
    for kind, open_session in PARITY_SESSIONS.items():
        sessions = {name: open_session(p, threads=config.threads) for name, p in paths.items()}
        for set_name, (data, ref, feeds) in cases.items():
            where = f"{set_name}, {kind} session"
            for name, result in _check_set(sessions, data, ref, feeds, atol, where).items():
                worst[name] = max(worst[name], result["max_abs_diff"])
        del sessions
    return {
        "reference": "the PyTorch converted model (out_of_range: its ids mapped to 0 first)",
        "runtime": f"onnxruntime {ort.__version__} (CPU)",
        "sessions": list(PARITY_SESSIONS),
        "samples": {k: len(v.data) for k, v in sets.items()},
        "max_bag": config.max_bag,
        "seed": config.seed,
        "atol": atol,
        "max_abs_diff": worst,
        "reference_data": stored,
    }


def _check_set(
    sessions: dict, data: Dataset, ref: dict[str, np.ndarray], feeds: dict, atol: float, where: str
) -> dict[str, dict]:
    """:func:`compare_outputs` of the three graphs on one parity set (``where`` names the set
    and the session kind in a failure)."""
    got = run_session(sessions["model"], feeds)[LOGITS]
    checks = {"model": compare_outputs(ref["logits"], got, atol, f"model.onnx logits ({where})")}
    got = run_session(sessions["dense_arch"], {"dense": data.dense})["dense_embedding"]
    checks["dense_arch"] = compare_outputs(
        ref["dense_embedding"], got, atol, f"dense_arch.onnx dense_embedding ({where})"
    )
    over_feeds = {k: ref[k] for k in ("dense_embedding", "sparse_embedding")}
    got = run_session(sessions["over_arch"], over_feeds)[LOGITS]
    checks["over_arch"] = compare_outputs(
        ref["over_logits"], got, atol, f"over_arch.onnx logits ({where})"
    )
    return checks


# ---------------------------------------------------------------------------------------------
# Manifest section


def _decls(decls: list[TensorDecl]) -> list[dict]:
    return [{"name": d.name, "dtype": d.dtype, "shape": list(d.shape)} for d in decls]


def _graph_entry(root: Path, rel: str, io: tuple[list[TensorDecl], list[TensorDecl]]) -> dict:
    model = onnx.load(str(root / rel), load_external_data=False)
    return {
        "file": rel,
        "external_data": external_files(model, rel),
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
        if k in ("external_data_threshold_bytes", "rowwise_impl")
    }
    settings["pooling"] = POOLING
    settings["one_hot_features"] = sorted(gspec.one_hot_features)
    return {
        "ir_version": IR_VERSION,
        "opset_imports": graphs["model"]["opset_imports"],
        "session_config": dict(SERVING_SESSION_CONFIG),
        "session_config_note": "optional (what the Predictor sets: worker threads do not spin); "
        "the graphs are exact without any session option, parity was proven both in a plain "
        "InferenceSession(path) and with these",
        "out_of_range_ids": OUT_OF_RANGE_IDS,
        "out_of_range_ids_note": "an id outside [0, rows) of its table reads row 0 of that table "
        "(FBGEMM's bounds check, BoundsCheckMode.WARNING); the Predictor refuses such ids unless "
        "out_of_range='row0'",
        "graphs": graphs,
        "export": settings,
        "parity": parity,
    }
