"""Fine-tuning without data: distil the compressed model from the original on sampled inputs.

When a recipe that fine-tunes runs without ``--data``, the teacher (the original FP32 model) labels
inputs drawn from its own tables: each sparse feature one id per bag, uniform over the table's rows
(the access frequencies are unknown without data); dense features standard normal (the true dense distribution is unknown without
data). The student is trained on the teacher's click probabilities as soft labels with the
ordinary loop; a ``--valid`` set, when given, still selects the best step. This keeps the compressed
model close to the original; real click data does better, and the CLI says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.data.dataset import Dataset
from compress.io.model_spec import DLRMSpec
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
) -> TrainResult:
    """Train ``student`` towards ``teacher``'s click probabilities on :func:`sample_inputs`
    (``inputs``: the run's fingerprints, saved with the state; see :func:`fit`)."""
    sampled = sample_inputs(spec, samples, config.seed)
    was_training = teacher.training  # the teacher may be the caller's live module: restore it
    teacher.eval()
    try:
        logits = predict_logits(lambda b: teacher(b.dense, b.sparse), sampled, spec.feature_names)
    finally:
        teacher.train(was_training)
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
    )
