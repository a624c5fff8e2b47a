"""Score a model on a dataset: AUC, log loss, accuracy (the ``eval`` command's numbers).

The data is an in-memory :class:`~compress.data.dataset.Dataset` or a streamed one
(:class:`~compress.data.stream.StreamedData`, read in file order by its workers): the metrics need
only each row's logit and label (8 bytes a row), so a streamed set is never held in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from typing import TYPE_CHECKING

import numpy as np
import torch

from compress.data.batches import Batch
from compress.data.dataset import Dataset
from compress.progress import progress
from compress.train.metrics import evaluate

if TYPE_CHECKING:
    from compress.data.stream import StreamedData

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


@torch.no_grad()
def predict_with_labels(
    score: ScoreFn,
    data: Dataset | StreamedData,
    feature_names: tuple[str, ...],
    batch_size: int = 4096,
    desc: str = "eval",
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [N], labels [N])`` of ``score`` over ``data`` in order, for an in-memory or a
    streamed set (whose labels are only known once read)."""
    if isinstance(data, Dataset):
        return predict_logits(score, data, feature_names, batch_size, desc), data.labels
    logits, labels = [], []
    batches = data.batches(batch_size, feature_names=feature_names)
    with closing(batches):  # an error or Ctrl-C while scoring ends the workers at once
        for batch in progress(batches, total=data.num_batches(batch_size), desc=desc):
            logits.append(score(batch).reshape(-1).float().numpy())
            labels.append(batch.labels.numpy())
    if not logits:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate(logits), np.concatenate(labels)


def model_logits(
    module: torch.nn.Module,
    dataset: Dataset | StreamedData,
    feature_names: tuple[str, ...],
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [N], labels [N])`` of a TorchRec DLRM (called as ``module(dense, kjt)``, in eval
    mode) on an in-memory or streamed set."""
    was_training = module.training
    module.eval()
    try:
        return predict_with_labels(
            lambda b: module(b.dense, b.sparse), dataset, feature_names, batch_size
        )
    finally:
        module.train(was_training)


def evaluate_model(
    module: torch.nn.Module,
    dataset: Dataset | StreamedData,
    feature_names: tuple[str, ...],
    batch_size: int = 4096,
) -> dict:
    """``{"auc", "logloss", "accuracy", "n"}`` of a TorchRec DLRM (called as ``module(dense, kjt)``)
    on an in-memory or streamed set."""
    return evaluate(*model_logits(module, dataset, feature_names, batch_size))
