"""Fine-tuning against the original model (``[finetune] target = "teacher"``): distillation on the
real training inputs.

A compressed model fine-tuned on the labels of the data the original was trained on sees that data
a second time, and a second epoch overfits (the usual one-epoch behaviour of embedding models);
what it should recover is only what compression lost. With ``target = "teacher"`` the loss of a
batch is the binary cross-entropy of the student's logits against the original (FP32) model's
click probabilities on the same inputs, computed under ``no_grad``: the student is pulled back to
what the original scored, input by input (knowledge distillation, Hinton et al. 2015, here with
the real inputs rather than sampled ones, :mod:`compress.train.distill`). On
``benchmarks/bench_ranges_quality.py``'s case INT2 QAT recovered +0.0014 AUC over INT2 PTQ this
way, +0.0003 on the labels.

The teacher runs on the CPU, where the pipeline keeps the original model; a batch on another
device is copied back for it, and its probabilities go to the batch's device. It reads its tables
where they are: for a memory-mapped checkpoint, the pages of the rows the data looks up become
resident, as a PTQ conversion's reads do not (a step costs one more forward pass, no backward).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from compress.data.batches import Batch
from compress.train.loop import LossFn, default_score

__all__ = ["teacher_loss", "teacher_probabilities"]


def teacher_probabilities(teacher: nn.Module, batch: Batch) -> torch.Tensor:
    """The teacher's click probabilities ``[B]`` of ``batch`` (no gradient), on the batch's
    device."""
    from compress.train.device import batch_to

    device = batch.dense.device
    on_cpu = batch if device.type == "cpu" else batch_to(batch, torch.device("cpu"))
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            return torch.sigmoid(default_score(teacher, on_cpu)).to(device)
    finally:
        teacher.train(was_training)


def teacher_loss(teacher: nn.Module) -> LossFn:
    """The loss of ``target = "teacher"``: BCE of the student's logits against
    :func:`teacher_probabilities` (the batch's labels are not used)."""

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        target = teacher_probabilities(teacher, batch)
        return F.binary_cross_entropy_with_logits(default_score(model, batch), target)

    return loss
