"""Fine-tuning settings (a recipe's ``[finetune]`` table), apart from the loop so recipes load fast."""

from __future__ import annotations

import math
from dataclasses import dataclass

OPTIMIZERS = ("adagrad", "sgd", "adam")
#: What picks the kept step (``select_on``): lower log loss, or higher AUC, on the selection slice.
SELECT_METRICS = ("logloss", "auc")
DEFAULT_SELECT_ON = SELECT_METRICS[0]
#: Training steps between the table-wide ``max|W|`` scans that set a table-wise QAT table's scale
#: (a recipe rule's ``scale_refresh``): DQRM's ``P``, 200 in its Criteo Kaggle runs (Yang et al.,
#: arXiv 2410.20046). Row-wise scales depend on the row alone and need no refresh.
DEFAULT_SCALE_REFRESH = 200


@dataclass
class TrainConfig:
    """Fine-tuning settings (the ``[finetune]`` table of a recipe).

    ``steps`` wins over ``epochs`` when both are set. ``eval_every=0`` evaluates only at the end.
    ``optimizer`` steps the embedding parameters and must accept sparse gradients (adagrad or sgd)
    when tables train; ``dense_optimizer`` steps everything else (default: the same kind).
    ``keep_best`` keeps the weights of the evaluation with the best ``select_on`` metric
    (``"logloss"``, lower is better and also catches calibration damage; or ``"auc"``) on the
    validation rows the loop is given (the pipeline gives it the selection slice only).
    """

    steps: int | None = None
    epochs: float | None = 1.0
    batch_size: int = 2048
    optimizer: str = "adagrad"
    dense_optimizer: str | None = None
    lr_embedding: float = 0.02
    lr_dense: float = 0.005
    eval_every: int = 0
    eval_batch_size: int = 8192
    keep_best: bool = True
    select_on: str = DEFAULT_SELECT_ON
    seed: int = 0
    checkpoint_every: int = 200

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        per_epoch = max(1, n_train // self.batch_size)
        return max(1, int(math.ceil((self.epochs or 1.0) * per_epoch)))
