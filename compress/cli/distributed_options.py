"""``--nproc``, ``--device``, ``--max-restarts``: where and on how many processes the main job
fine-tunes (:mod:`compress.train.distributed`). Importing this module imports no torch."""

from __future__ import annotations

import click

#: ``--device`` choices (the same as :data:`compress.train.device.DEVICES`).
DEVICE_CHOICES = ("cpu", "cuda")
#: The most workers ``--nproc`` starts on one machine, and the most restarts.
MAX_NPROC = 1024
MAX_RESTARTS = 100


def distributed_options(f):
    """Add the three options to a command (its function takes ``nproc``, ``device`` and
    ``max_restarts``)."""
    f = click.option(
        "--max-restarts",
        type=click.IntRange(min=0, max=MAX_RESTARTS),
        default=0,
        show_default=True,
        metavar="K",
        help="With --nproc: when a worker fails, start the workers again up to K times; they "
        "continue from the last saved training state.",
    )(f)
    f = click.option(
        "--device",
        type=click.Choice(DEVICE_CHOICES),
        default="cpu",
        show_default=True,
        help="Where fine-tuning runs (cuda: one GPU per worker, NCCL between workers).",
    )(f)
    f = click.option(
        "--nproc",
        type=click.IntRange(min=1, max=MAX_NPROC),
        default=1,
        show_default=True,
        metavar="N",
        help="Fine-tune on N worker processes of this machine (PyTorch's elastic launcher; gloo "
        "on CPU): each trains on its share of every batch and gradients are exchanged as the "
        "recipe's embedding_grad_bits / mlp_grad_bits say. Under torchrun, leave it out.",
    )(f)
    return f
