"""What a data-parallel run sent, against two references: the ``distributed`` object of ``--json``.

Per rank and training step (averages over the steps this process exchanged):

- ``bytes_per_step``: bytes of the tensors this rank handed to the collectives (the step's header,
  its embedding message padded as gathered, its dense buffer), counted by
  :class:`~compress.train.distributed.comm.Comm`;
- ``dense_bytes_per_step``: what a dense FP32 all-reduce of every trained parameter (the trained
  tables whole, and the MLPs) would hand over: 4 bytes per parameter value;
- ``floor_bytes_per_step``: the INT8 scheme's floor, distinct touched rows x (dim x 1 B + 4 B scale
  + 4 B id), plus the dense gradients at ``mlp_grad_bits``.

``bytes_by_part`` splits ``bytes_per_step``; ``rows_per_step`` is the distinct rows sent.
``communication_seconds`` is the whole exchange (coalescing, coding, collectives, decoding, summing),
``seconds_by_part`` its embedding part (the header included) and dense part, and
``collective_seconds`` the time inside the collectives, waiting for the other ranks included.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from compress.train.distributed.comm import STEP_PURPOSES, CommStats
from compress.train.distributed.context import DistContext
from compress.train.distributed.grad_exchange import ExchangeSettings, StepCounts


def dense_bytes(params: Sequence[nn.Parameter]) -> int:
    """Bytes of a dense FP32 all-reduce of ``params``: 4 per value."""
    return 4 * sum(p.numel() for p in params)


def report(
    ctx: DistContext,
    settings: ExchangeSettings,
    params: Sequence[nn.Parameter],
    counts: StepCounts,
    stats: CommStats,
    seconds: float,
) -> dict:
    """The ``distributed`` object (see the module docstring)."""
    steps = max(1, counts.steps)
    sent = stats.step_bytes()
    dense = dense_bytes(params)
    floor = counts.floor_bytes / steps
    return {
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "embedding_grad_bits": settings.embedding_bits,
        "mlp_grad_bits": settings.dense_bits,
        "steps": counts.steps,
        "bytes_per_step": round(sent / steps, 1),
        "dense_bytes_per_step": dense,
        "floor_bytes_per_step": round(floor, 1),
        "bytes_by_part": {p: round(stats.sent.get(p, 0) / steps, 1) for p in STEP_PURPOSES},
        "rows_per_step": round(counts.rows / steps, 1),
        "vs_floor": round(sent / steps / floor, 4) if floor else None,
        "dense_over_sent": round(dense / (sent / steps), 1) if sent else None,
        "communication_seconds": round(seconds, 3),
        "seconds_by_part": {
            "embedding": round(counts.sparse_seconds, 3),
            "dense": round(counts.dense_seconds, 3),
        },
        "collective_seconds": round(stats.step_seconds(), 3),
        "restarts": ctx.restart_count,
    }
