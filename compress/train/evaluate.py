"""Score a model on a dataset: AUC, log loss, accuracy (the ``eval`` command's numbers)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from compress.data.batches import Batch
from compress.data.dataset import Dataset
from compress.progress import progress
from compress.train.metrics import evaluate

ScoreFn = Callable[[Batch], torch.Tensor]


@torch.no_grad()
def predict_logits(
    score: ScoreFn,
    dataset: Dataset,
    feature_names: tuple[str, ...],
    batch_size: int = 4096,
    desc: str = "eval",
) -> np.ndarray:
    """Logits ``[N]`` of ``score`` (a model called on a :class:`Batch`) over ``dataset`` in order."""
    out = []
    n_batches = (len(dataset) + batch_size - 1) // batch_size
    for batch in progress(
        dataset.batches(batch_size, feature_names=feature_names), total=n_batches, desc=desc
    ):
        out.append(score(batch).reshape(-1).float().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def evaluate_model(
    module: torch.nn.Module,
    dataset: Dataset,
    feature_names: tuple[str, ...],
    batch_size: int = 4096,
) -> dict:
    """``{"auc", "logloss", "accuracy", "n"}`` of a TorchRec DLRM (called as ``module(dense, kjt)``)."""
    was_training = module.training
    module.eval()
    try:
        logits = predict_logits(
            lambda b: module(b.dense, b.sparse), dataset, feature_names, batch_size
        )
    finally:
        module.train(was_training)
    return evaluate(logits, dataset.labels)
