"""Click-prediction metrics as pure functions of 1-D arrays: AUC, log loss, accuracy.

Inputs may be numpy arrays or torch tensors (any float dtype); labels are 0/1. Computation is in
float64. ``auc`` matches ``sklearn.metrics.roc_auc_score`` including ties (tied scores share their
average rank), ``logloss`` clips probabilities to ``[1e-7, 1 - 1e-7]``, and ``accuracy`` predicts a
click when the probability is above the threshold (``np.round`` semantics at 0.5, as the DLRM
reference code). Example::

    evaluate(np.array([2.0, -1.0, 0.5]), np.array([1, 0, 0]))
    # {"auc": 1.0, "logloss": ..., "accuracy": 0.666..., "n": 3}
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from compress.errors import DataError

if TYPE_CHECKING:  # torch is not imported here: ONNX Runtime serving scores numpy logits
    import torch

ArrayLike: TypeAlias = "np.ndarray | torch.Tensor"

LOGLOSS_EPS = 1e-7


def auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula with average ranks for ties.

    Raises :class:`DataError` when the labels hold only one class (AUC is undefined) and
    ``ValueError`` for NaN scores or mismatched shapes.
    """
    s, y = _pair(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if y.size == 0:
        raise DataError("AUC is undefined: no samples")
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"AUC is undefined: all {y.size} labels are {int(y[0])}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    ranks = average_ranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    new_group = np.empty(x.size, dtype=bool)
    new_group[:1] = True
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group_start = np.flatnonzero(new_group)
    group_end = np.append(group_start[1:], x.size)  # exclusive
    group_rank = (group_start + 1 + group_end) / 2.0  # mean of start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, group_end - group_start)
    return ranks


def logloss(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean binary cross-entropy of probabilities clipped to ``[1e-7, 1 - 1e-7]``."""
    p, y = _pair(probs, labels)
    p = np.clip(p, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def accuracy(probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> float:
    """Fraction of samples where ``probs > threshold`` equals the label."""
    p, y = _pair(probs, labels)
    return float(np.mean((p > threshold) == (y == 1)))


def sigmoid(logits: ArrayLike) -> np.ndarray:
    """float64 ``1 / (1 + exp(-x))`` without overflow warnings."""
    x = _as_float64(logits)
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def evaluate(logits: ArrayLike, labels: ArrayLike) -> dict[str, float | int]:
    """``{"auc", "logloss", "accuracy", "n"}`` of logits (shape ``[N]`` or ``[N, 1]``)."""
    x = _as_float64(logits)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    probs = sigmoid(x)
    return {
        "auc": auc(x, labels),
        "logloss": logloss(probs, labels),
        "accuracy": accuracy(probs, labels),
        "n": int(x.size),
    }


def _as_float64(a: ArrayLike) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach().cpu().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def _pair(values: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    v, y = _as_float64(values), _as_float64(labels)
    if v.ndim != 1 or v.shape != y.shape:
        raise ValueError(f"expected two 1-D arrays of one length, got {v.shape} and {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return v, y
