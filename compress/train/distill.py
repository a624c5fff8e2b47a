"""Fine-tuning without data: distil the compressed model from the original on sampled inputs.

When a recipe that fine-tunes runs without ``--data``, the teacher (the original FP32 model) labels
inputs drawn from its own tables: each sparse feature one id per bag, uniform over the table's rows
(the access frequencies are unknown without data); dense features standard normal (the true dense distribution is unknown without
data). The student is trained on the teacher's click probabilities as soft labels with the
ordinary loop; a ``--valid`` set, when given, still selects the best step. This keeps the compressed
model close to the original; real click data does better, and the CLI says so.

The teacher scores the samples through a compact copy of itself (:func:`compact_teacher`): its
dense layers, and of each table only the rows sampled (at most :data:`DISTILL_SAMPLES` a table),
read chunk by chunk (:func:`compress.io.table_stream.row_chunks`; a memory-mapped checkpoint's
table from its file). Random reads through the checkpoint's mapping would leave most of its pages
resident (the kernel maps the cached neighbours of each page read); the compact copy costs the
rows and nothing after. The logits are the same: the same rows, summed by the same TorchRec
modules.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compress.data.dataset import Dataset
from compress.io.model_spec import DLRMSpec
from compress.io.table_stream import row_chunks
from compress.train.evaluate import predict_logits
from compress.train.loop import TrainConfig, TrainResult, fit

DISTILL_SAMPLES = 65_536


def sample_inputs(spec: DLRMSpec, n: int, seed: int) -> Dataset:
    """``n`` unlabelled inputs (labels 0) with one uniform id per bag for every feature."""
    rng = np.random.default_rng([seed, 0xD157])
    dense = rng.standard_normal((n, spec.dense_in_features), dtype=np.float32)
    offsets = np.arange(n + 1, dtype=np.int64)
    values = {
        f: rng.integers(0, spec.table_of_feature(f).num_embeddings, n) for f in spec.feature_names
    }
    return Dataset(
        dense=dense,
        labels=np.zeros(n, np.float32),
        values=values,
        offsets={f: offsets for f in spec.feature_names},
    )


def gather_rows(weight: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """Rows ``ids`` (sorted, unique) of ``weight``, read chunk by chunk (:func:`row_chunks`)."""
    out = torch.empty((len(ids), *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    for start, stop, rows in row_chunks(weight):
        lo, hi = np.searchsorted(ids, [start, stop])
        if hi > lo:
            pick = torch.from_numpy(ids[lo:hi] - start).to(rows.device)
            out[lo:hi] = rows.index_select(0, pick)
    return out


def compact_teacher(teacher: nn.Module, sampled: Dataset) -> tuple[nn.Module, Dataset] | None:
    """A copy of ``teacher`` whose tables hold only the rows ``sampled`` reads, and ``sampled``
    with its ids renumbered into them (the logits are the same); ``None`` when the teacher's
    tables are not one TorchRec ``EmbeddingBagCollection`` (it then scores as it is).

    The copy shares nothing the caller could see change: the teacher is untouched.
    """
    sparse = getattr(teacher, "sparse_arch", None)
    ebc = getattr(sparse, "embedding_bag_collection", None)
    if type(ebc) is not EmbeddingBagCollection or ebc.is_weighted():
        return None
    configs, weights = [], {}
    values = dict(sampled.values)
    for cfg in ebc.embedding_bag_configs():
        ids = np.unique(np.concatenate([sampled.values[f] for f in cfg.feature_names]))
        weights[cfg.name] = gather_rows(ebc.embedding_bags[cfg.name].weight.detach(), ids)
        configs.append(replace(cfg, num_embeddings=len(ids)))
        for f in cfg.feature_names:
            values[f] = np.searchsorted(ids, sampled.values[f]).astype(np.int64)
    compact = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    for name, rows in weights.items():
        compact.embedding_bags[name].weight = nn.Parameter(rows, requires_grad=False)
    sparse.embedding_bag_collection = nn.Identity()  # not deep-copied: replaced
    try:
        copied = copy.deepcopy(teacher)
    finally:
        sparse.embedding_bag_collection = ebc
    copied.sparse_arch.embedding_bag_collection = compact
    renumbered = Dataset(
        dense=sampled.dense, labels=sampled.labels, values=values, offsets=sampled.offsets
    )
    return copied, renumbered


def teacher_logits(
    teacher: nn.Module, sampled: Dataset, feature_names: tuple[str, ...]
) -> np.ndarray:
    """``teacher``'s logits on ``sampled`` in eval mode, through :func:`compact_teacher` when it
    applies (the teacher's own mode is left as it was)."""
    compact = compact_teacher(teacher, sampled)
    model, data = compact if compact is not None else (teacher, sampled)
    was_training = model.training  # the teacher may be the caller's live module: restore it
    model.eval()
    try:
        return predict_logits(lambda b: model(b.dense, b.sparse), data, feature_names)
    finally:
        model.train(was_training)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    spec: DLRMSpec,
    config: TrainConfig,
    *,
    valid: Dataset | None = None,
    samples: int = DISTILL_SAMPLES,
    state_path: str | Path | None = None,
    resume: bool = False,
    log=None,
    inputs: Mapping[str, str] | None = None,
    distributed=None,
) -> TrainResult:
    """Train ``student`` towards ``teacher``'s click probabilities on :func:`sample_inputs`
    (``inputs``: the run's fingerprints, saved with the state; ``distributed``: a data-parallel
    worker's hooks, every worker sampling the same inputs; see :func:`fit`)."""
    sampled = sample_inputs(spec, samples, config.seed)
    logits = teacher_logits(teacher, sampled, spec.feature_names)
    soft = Dataset(
        dense=sampled.dense,
        labels=torch.sigmoid(torch.from_numpy(logits)).numpy(),
        values=sampled.values,
        offsets=sampled.offsets,
    )
    return fit(
        student,
        soft,
        valid,
        spec.feature_names,
        config,
        state_path=state_path,
        resume=resume,
        log=log,
        inputs=inputs,
        distributed=distributed,
    )
