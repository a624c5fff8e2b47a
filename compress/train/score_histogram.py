"""Fixed-bin histograms of a model's scores, one per class: what ROC and calibration curves need.

The report (``dqrm-compress report``) draws the ROC and calibration curves of the baseline and the
compressed model on the validation report slice. Every score would cost 4 bytes a row in the
artifacts; a histogram of the logits in :data:`BINS` fixed bins over ``[LOGIT_MIN, LOGIT_MAX)``
(logits beyond fall into the end bins), counting negatives and positives apart and summing the
predicted probabilities of each bin, costs a few kilobytes whatever the rows and is the same for
the same scores. From it:

* ROC: thresholds at the bin edges, true and false positive rates from the counts above each
  edge (exact at those thresholds; the AUC it gives is within the width of a bin of the exact one,
  which the manifest's metrics state);
* calibration: for bins merged into groups of similar size, the mean predicted probability
  (``probability_sums / count``) against the observed click rate (``positives / count``).

Example::

    metrics, hist = evaluate_with_histogram(model, report_slice, spec.feature_names)
    hist.to_json()  # {"logit_min": -10.0, "logit_max": 10.0, "negatives": [...], ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from compress.train.evaluate import model_logits
from compress.train.metrics import evaluate, sigmoid

if TYPE_CHECKING:
    from compress.data.dataset import Dataset
    from compress.data.stream import StreamedData

#: The logit range the bins cover (probabilities 4.5e-5 to 1 - 4.5e-5) and the number of bins
#: (0.05 logits wide: finer than the spread of any click model's scores).
LOGIT_MIN, LOGIT_MAX, BINS = -10.0, 10.0, 400
#: Significant digits kept of each bin's probability sum (the same sums whatever the batch size).
SUM_DIGITS = 10


@dataclass(frozen=True)
class ScoreHistogram:
    """Counts of negatives and positives and the sum of predicted probabilities per logit bin;
    bin ``i`` covers ``[logit_min + i*w, logit_min + (i+1)*w)``, ``w = (logit_max - logit_min) /
    len(negatives)``, the first and last bins also everything beyond."""

    negatives: tuple[int, ...]
    positives: tuple[int, ...]
    probability_sums: tuple[float, ...]
    logit_min: float = LOGIT_MIN
    logit_max: float = LOGIT_MAX

    def to_json(self) -> dict:
        return {
            "logit_min": self.logit_min,
            "logit_max": self.logit_max,
            "negatives": list(self.negatives),
            "positives": list(self.positives),
            "probability_sums": list(self.probability_sums),
        }


def bin_index(logits: np.ndarray, bins: int = BINS) -> np.ndarray:
    """The bin of each logit (float64 ``[N]``), those beyond the range in the end bins."""
    width = (LOGIT_MAX - LOGIT_MIN) / bins
    return np.clip(np.floor((logits - LOGIT_MIN) / width), 0, bins - 1).astype(np.int64)


def score_histogram(logits: np.ndarray, labels: np.ndarray, bins: int = BINS) -> ScoreHistogram:
    """The :class:`ScoreHistogram` of ``logits [N]`` with 0/1 ``labels [N]``."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) == 1
    idx = bin_index(x, bins)
    pos = np.bincount(idx[y], minlength=bins)
    neg = np.bincount(idx[~y], minlength=bins)
    sums = np.bincount(idx, weights=sigmoid(x), minlength=bins)
    return ScoreHistogram(
        negatives=tuple(int(v) for v in neg),
        positives=tuple(int(v) for v in pos),
        probability_sums=tuple(float(f"{v:.{SUM_DIGITS}g}") for v in sums),
    )


def evaluate_with_histogram(
    module: torch.nn.Module,
    data: Dataset | StreamedData,
    feature_names: tuple[str, ...],
    batch_size: int = 4096,
) -> tuple[dict, ScoreHistogram]:
    """``evaluate_model``'s metrics of ``module`` on ``data`` and the histogram of the same scores
    (one pass over the data)."""
    logits, labels = model_logits(module, data, feature_names, batch_size)
    return evaluate(logits, labels), score_histogram(logits, labels)
