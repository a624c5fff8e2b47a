"""Fine-tuning settings (a recipe's ``[finetune]`` table), apart from the loop so recipes load fast."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: What ``optimizer`` (the embedding parameters) may name. ``rowwise_adagrad`` is FBGEMM's
#: ``EXACT_ROWWISE_ADAGRAD``, one accumulator per table row (:mod:`compress.train.rowwise_adagrad`).
OPTIMIZERS = ("adagrad", "sgd", "adam", "rowwise_adagrad")
#: Optimizers that take the sparse gradients of tables that train.
SPARSE_OPTIMIZERS = ("adagrad", "sgd", "rowwise_adagrad")
#: What ``dense_optimizer`` (every other parameter) may name: row-wise Adagrad is for tables.
DENSE_OPTIMIZERS = ("adagrad", "sgd", "adam")
#: What picks the kept step (``select_on``): lower log loss, or higher AUC, on the selection slice.
SELECT_METRICS = ("logloss", "auc")
DEFAULT_SELECT_ON = SELECT_METRICS[0]
#: Training steps between the table-wide ``max|W|`` scans that set a table-wise QAT table's scale
#: (a recipe rule's ``scale_refresh``): DQRM's ``P``, 200 in its Criteo Kaggle runs (Yang et al.,
#: arXiv 2410.20046). Row-wise scales depend on the row alone and need no refresh.
DEFAULT_SCALE_REFRESH = 200
#: The longest fine-tuning run a recipe (``steps``, ``epochs``) or ``--steps`` may ask for: far
#: beyond any real run (10^9 steps are 11 days at 1,000 steps a second, 1,000 epochs of Criteo 1TB
#: years), close enough that a typo such as ``epochs = 1e300`` is an error, not an endless run.
MAX_STEPS = 10**9
MAX_EPOCHS = 1000
#: What ``embedding_grad_bits`` and ``mlp_grad_bits`` may be: the width gradients are exchanged at
#: between the workers of a data-parallel run (``--nproc``, :mod:`compress.train.distributed`).
GRAD_BITS = (8, 32)
#: What fine-tuning fits (``target``): the data's click labels, or the original (FP32) model's
#: click probabilities on the same inputs (distillation on real data,
#: :mod:`compress.train.teacher`).
TARGETS = ("labels", "teacher")


@dataclass
class TrainConfig:
    """Fine-tuning settings (the ``[finetune]`` table of a recipe).

    ``steps`` wins over ``epochs`` when both are set. ``eval_every=0`` evaluates only at the end.
    ``optimizer`` steps the embedding parameters and must accept sparse gradients (adagrad,
    rowwise_adagrad or sgd) when tables train; ``dense_optimizer`` steps everything else (default:
    the same kind, element-wise ``adagrad`` for ``rowwise_adagrad``; :meth:`dense_optimizer_kind`).
    ``keep_best`` keeps the weights of the evaluation with the best ``select_on`` metric
    (``"logloss"``, lower is better and also catches calibration damage; or ``"auc"``) on the
    validation rows the loop is given (the pipeline gives it the selection slice only).
    ``embedding_grad_bits`` / ``mlp_grad_bits``: the width of the sparse embedding gradients and
    of the dense (MLP) gradients exchanged between workers (8: INT8, a scale per row / per 256
    values with error feedback; 32: exact); ``None`` means 32. A single process ignores them.
    ``target``: what the loss fits on the training inputs, their labels (``"labels"``) or the
    original model's click probabilities (``"teacher"``; :data:`TARGETS`).
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
    embedding_grad_bits: int | None = None
    mlp_grad_bits: int | None = None
    target: str = "labels"

    def dense_optimizer_kind(self) -> str:
        """The optimizer of the dense parameters: ``dense_optimizer``, else the embeddings' kind
        (``adagrad`` when that is ``rowwise_adagrad``, which only tables use)."""
        if self.dense_optimizer is not None:
            return self.dense_optimizer
        return "adagrad" if self.optimizer == "rowwise_adagrad" else self.optimizer

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        per_epoch = max(1, n_train // self.batch_size)
        return max(1, int(math.ceil((self.epochs or 1.0) * per_epoch)))
