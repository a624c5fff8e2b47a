"""Do the replicas fit? Data parallelism holds every trained table in every worker.

Each worker of a data-parallel run keeps the whole model: the tables' FP32 master weights (pages
of the memory-mapped checkpoint, shared by the workers of a machine until fine-tuning writes a row)
and its own optimizer state for them: Adagrad one float32 per table value, row-wise Adagrad one per
row, plain SGD none. :func:`check` refuses, before training starts, a run whose workers on this
machine would need more of that private state than the machine has available, with one line that
says so and what would help.

Why tables are not sharded over the workers instead (TorchRec's ``DistributedModelParallel``,
table-wise): TorchRec shards only its own ``EmbeddingBagCollection``. Given the prepared
(quantization-aware) collection, its stock sharder leaves it unsharded (an empty plan: every
worker holds every table); a sharder declared for the QAT collection fails in
``ShardedEmbeddingBagCollection`` (``AttributeError: 'QATEmbeddingBagCollection' object has no
attribute 'is_weighted'``, torchrec 1.8.0), and past that its sharded lookups are FBGEMM's own
table-batched kernels, which gather rows without letting the QAT collection fake-quantize them:
the tables would silently fine-tune in FP32. A QAT-aware sharded module (a KJT all-to-all to the
owner of each table, the local fake-quantized lookups, a pooled-embedding all-to-all back) is not
built here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from compress.errors import SettingError
from compress.io.summary import format_bytes

#: Optimizer state bytes per table value (``per_value``) or per table row (``per_row``).
_STATE = {"adagrad": (4, 0), "rowwise_adagrad": (0, 4), "sgd": (0, 0), "adam": (8, 0)}


def state_bytes(tables: Sequence[nn.Parameter], optimizer: str) -> int:
    """Bytes of ``optimizer``'s state for ``tables`` in one worker."""
    per_value, per_row = _STATE.get(optimizer, (4, 0))
    return sum(p.numel() * per_value + (p.shape[0] if p.dim() else 1) * per_row for p in tables)


def available_bytes() -> int | None:
    """``MemAvailable`` of this machine (``None`` where ``/proc/meminfo`` does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check(tables: Sequence[nn.Parameter], optimizer: str, workers_here: int) -> None:
    """Refuse (:class:`SettingError`) when ``workers_here`` workers' optimizer state for
    ``tables`` exceeds the memory this machine has available."""
    need = state_bytes(tables, optimizer) * workers_here
    have = available_bytes()
    if have is None or need <= have:
        return
    raise SettingError(
        f"{workers_here} workers on this machine need {format_bytes(need)} of {optimizer} state "
        f"for the fine-tuned tables (each worker holds all tables: data parallelism), "
        f"{format_bytes(have)} is available; use fewer workers per machine (torchrun spreads them "
        "over machines) or a row-wise or stateless optimizer (rowwise_adagrad, sgd); table-wise "
        "sharding of fine-tuned tables is not supported (README: Distributed fine-tuning)"
    )
