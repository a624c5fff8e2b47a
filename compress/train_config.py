"""Fine-tuning settings (a recipe's ``[finetune]`` table), apart from the loop so recipes load fast."""

from __future__ import annotations

import math
from dataclasses import dataclass

OPTIMIZERS = ("adagrad", "sgd", "adam")


@dataclass
class TrainConfig:
    """Fine-tuning settings (the ``[finetune]`` table of a recipe).

    ``steps`` wins over ``epochs`` when both are set. ``eval_every=0`` evaluates only at the end.
    ``optimizer`` steps the embedding parameters and must accept sparse gradients (adagrad or sgd)
    when tables train; ``dense_optimizer`` steps everything else (default: the same kind).
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
    seed: int = 0
    checkpoint_every: int = 200

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        per_epoch = max(1, n_train // self.batch_size)
        return max(1, int(math.ceil((self.epochs or 1.0) * per_epoch)))
