"""What the report needs beyond the manifest, measured while compressing: ``report_data.json``.

The artifact writer stores :func:`collect_report_data`'s object as ``report_data.json``
(:data:`compress.report_format.REPORT_DATA_FILE`; sorted keys, no timestamps: the same inputs and
seed give the same bytes); ``dqrm-compress report`` (:mod:`exporters.report`) draws from it.
Version :data:`~compress.report_format.REPORT_DATA_VERSION`::

    version             1
    plan_tables         the plan's tables (``plan --json``'s): rule, method, bits, bytes before/after
    checkpoint          {"sha256": ..., "of": ...}: the weights as loaded (the fingerprint --resume
                        records, compress.train.inputs)
    scores              null without validation data, else {"slice": the report slice,
                        "baseline": ScoreHistogram, "compressed": ScoreHistogram}
                        (compress.train.score_histogram)
    reconstruction      {"weights": what weighted the rows or null, "note": why not weighted or
                        null, "tables": [TableError...]} (compress.methods.reconstruction)
    selection_baseline  null, or {"slice", "metrics"}: the checkpoint scored on the selection slice,
                        the rows train_log.jsonl's evaluations are on (only when fine-tuning
                        evaluated there)
    control             only with --control on a recipe that fine-tunes (absent otherwise): the
                        same fine-tuning applied to the uncompressed model (compress.control),
                        {"steps", "best_step", "history": its evaluations on the selection slice as
                        train_log.jsonl holds the run's, "metrics": on the report slice}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compress.data.dataset import Dataset
from compress.io.model import LoadedModel
from compress.methods.reconstruction import measure_tables
from compress.plan import Plan
from compress.report_format import REPORT_DATA_VERSION
from compress.train.evaluate import evaluate_model
from compress.train.score_histogram import ScoreHistogram
from compress.train.validation import ValidationSlices

#: What the checkpoint's sha256 covers.
CHECKPOINT_HASH_OF = (
    "the weights as loaded: state-dict tensors by sorted key (name, dtype, shape, bytes)"
)


def collect_report_data(
    job: LoadedModel,
    plan: Plan,
    model: nn.Module,
    shared: Sequence[Any],
    *,
    scores: Mapping[str, ScoreHistogram],
    slices: ValidationSlices | None,
    train_data: Any,
    train_name: str | None,
    counts: Mapping[str, torch.Tensor] | None,
    finetuned: bool,
    checkpoint_sha256: str | None = None,
    control: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``report_data.json`` object of a finished run (see the module docstring): ``model`` is
    the converted model, ``shared`` its sharing groups, ``scores`` the histograms of the baseline
    and compressed evaluations, ``counts`` the training data's row counts when already taken
    (taken here for in-memory data; streamed data is not read again for them), ``finetuned``
    whether fine-tuning evaluated on ``slices.select``, ``checkpoint_sha256`` the fingerprint when
    already computed, ``control`` the control run's record (kept under ``"control"`` when given)."""
    counts, weights, note = _row_weights(job, train_data, train_name, counts)
    measured = measure_tables(
        job.module, model, job.spec, plan, shared, counts, fingerprint=checkpoint_sha256 is None
    )
    names = job.spec.feature_names
    selection = None
    if finetuned and slices is not None:
        selection = {
            "slice": slices.select_name,
            "metrics": evaluate_model(job.module, slices.select, names),
        }
    return {
        "version": REPORT_DATA_VERSION,
        "plan_tables": plan.to_json()["tables"],
        "checkpoint": {
            "sha256": checkpoint_sha256 or measured.checkpoint_sha256,
            "of": CHECKPOINT_HASH_OF,
        },
        "scores": None
        if not scores or slices is None
        else {"slice": slices.report_name, **{k: h.to_json() for k, h in sorted(scores.items())}},
        "reconstruction": {
            "weights": weights,
            "note": note,
            "tables": [e.to_json() for e in measured.errors],
        },
        "selection_baseline": selection,
        **({} if control is None else {"control": control}),
    }


def _row_weights(
    job: LoadedModel,
    train_data: Any,
    train_name: str | None,
    counts: Mapping[str, torch.Tensor] | None,
) -> tuple[Mapping[str, torch.Tensor] | None, str | None, str | None]:
    """``(counts, what they are, why there are none)`` for the frequency-weighted error."""
    if train_data is None:
        return None, None, "no training data: rows are not weighted by frequency"
    if counts is None and isinstance(train_data, Dataset):
        from compress.pipeline import row_counts  # the pipeline's counting, one home

        counts = row_counts(train_data, job.spec)
    if counts is None:
        return None, None, "streamed training data is not read again to count rows"
    return counts, f"row frequency in the training data ({train_name})", None
