"""Which validation rows choose the fine-tuning step and which rows the reported metrics are on.

A score measured on the rows that chose the model is biased upwards: keep-best selection on the
reported rows can never report less than the model before fine-tuning and so hides a run that got
worse. The validation rows are therefore cut in two, deterministically (no seed, no copy: both
parts are views of the data, so memory-mapped days stay mapped):

- the **selection slice**, the first :data:`SELECT_FRACTION` (20%) of the validation rows in file
  order: fine-tuning evaluations (``train_log.jsonl``) and the choice of the kept step use these
  rows only;
- the **report slice**, the remaining 80%: ``baseline``, ``before_finetune`` and ``compressed``
  are all measured on exactly these rows, never used for selection.

The validation rows are ``--valid`` when given, else the last :data:`HOLDOUT_FRACTION` (20%) of
``--data``, which is never trained on (so ``--data`` alone gives 80% training, the next 4%
selection, the last 16% report). Every recipe, fine-tuned or not, reports on the same report
slice, so the numbers of different recipes on one data set compare row for row.

Why these fractions. The selection slice ranks a few evaluations of one model against each other
on the same rows; such paired differences are far less noisy than absolute scores, so a fifth of
the rows suffices, while the report slice keeps 80% of them (its standard error grows by only
``1/sqrt(0.8)``, about 1.12x). The held-out 20% of ``--data`` keeps the report slice (16%) larger
than the 10% tail that was reported before the selection slice existed, and it is the same split
the demo uses for its train and valid files. Why the selection slice comes first: Criteo files are
ordered by time, and evaluating on the most recent samples is how Criteo benchmarks hold data out,
so the report slice is the most recent part and the selection slice lies between it and training.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.data.dataset import Dataset
from compress.errors import DataError

#: Fraction of ``--data`` held out (its tail) when no ``--valid`` is given; also the demo's split.
HOLDOUT_FRACTION = 0.2
#: Fraction of the validation rows (its head) that selects the fine-tuning step.
SELECT_FRACTION = 0.2


@dataclass(frozen=True)
class ValidationSlices:
    """The selection and report slices of one validation set, with names that say where they come
    from (``valid.npz[0:300]``: rows 0 to 299 of that file, Python slice notation)."""

    select: Dataset
    report: Dataset
    select_name: str
    report_name: str


def split_validation(valid: Dataset, name: str, offset: int = 0) -> ValidationSlices:
    """Cut ``valid`` (rows ``offset`` onwards of the source ``name``) into the selection slice
    (its first :data:`SELECT_FRACTION`) and the report slice (the rest).

    :class:`DataError` when either slice would be empty.
    """
    n = len(valid)
    n_select = int(round(n * SELECT_FRACTION))
    if n_select == 0 or n_select == n:
        raise DataError(
            f"{name}: {n} validation rows are too few to hold {SELECT_FRACTION:.0%} of them out "
            "for choosing the fine-tuning step and report on the rest"
        )
    return ValidationSlices(
        select=valid.slice(0, n_select),
        report=valid.slice(n_select, n),
        select_name=f"{name}[{offset}:{offset + n_select}]",
        report_name=f"{name}[{offset + n_select}:{offset + n}]",
    )
