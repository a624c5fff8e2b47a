"""Metrics against brute force and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compress.errors import DataError
from compress.train.metrics import accuracy, auc, average_ranks, evaluate, logloss, sigmoid


def brute_force_auc(scores, labels) -> float:
    """Fraction of (positive, negative) pairs ranked right; ties count one half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 300).astype(np.float32)  # many ties
    labels = rng.integers(0, 2, 300)
    assert auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_auc_hand_values_and_torch_inputs():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # sklearn's doc example
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    assert auc(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, 0.0])) == 1.0
    assert auc([3.0, 1.0, 2.0], [0, 1, 1]) == 0.0


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(
        average_ranks(np.array([5.0, 1.0, 5.0, 3.0, 5.0])), [4, 1, 4, 2, 4]
    )


def test_auc_errors():
    with pytest.raises(DataError, match="only|all"):
        auc([0.2, 0.3], [1, 1])
    with pytest.raises(DataError, match="no samples"):
        auc(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        auc([float("nan"), 0.1], [0, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        auc([0.2, 0.3], [0, 2])
    with pytest.raises(ValueError, match="1-D"):
        auc([0.2, 0.3], [0, 1, 1])


def test_logloss_hand_values_and_clipping():
    expected = -(math.log(0.9) + math.log(0.8)) / 2
    assert logloss([0.9, 0.2], [1, 0]) == pytest.approx(expected)
    assert logloss([0.0, 1.0], [1, 0]) == pytest.approx(-math.log(1e-7))
    assert logloss([1.0, 0.0], [1, 0]) == pytest.approx(-math.log(1 - 1e-7))


def test_accuracy_threshold_is_strict():
    assert accuracy([0.5, 0.51, 0.2, 0.9], [0, 1, 0, 0]) == 0.75
    assert accuracy([0.3, 0.7], [1, 1], threshold=0.25) == 1.0


def test_evaluate_from_logits():
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]])
    labels = np.array([1, 0, 0, 1], dtype=np.float32)
    m = evaluate(logits, labels)
    p = 1 / (1 + np.exp(-logits.numpy()[:, 0].astype(np.float64)))
    assert m["n"] == 4
    assert m["auc"] == pytest.approx(brute_force_auc(p, labels))
    assert m["logloss"] == pytest.approx(
        -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    )
    assert m["accuracy"] == 0.5
    np.testing.assert_allclose(sigmoid(np.array([-800.0, 0.0, 800.0])), [0.0, 0.5, 1.0])
