"""Training on a device other than the CPU: batches follow the model, scores come back.

Data is read and batched on the CPU. When the model sits on another device (``--device cuda``:
the pipeline moves the prepared model there for fine-tuning and back for convert, :func:`on_device`),
the loop moves each batch to it (:func:`batch_to`) and brings evaluation logits back
(:func:`scores_on_cpu`). On the CPU nothing is moved or copied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compress.data.batches import Batch
from compress.errors import SettingError

#: ``--device`` choices.
DEVICES = ("cpu", "cuda")


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """``torch.device`` for ``--device name`` (``cuda``: GPU ``local_rank``); a
    :class:`SettingError` when no such device is visible."""
    if isinstance(name, torch.device):
        return name
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise SettingError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if not torch.cuda.is_available():
        raise SettingError(
            "--device cuda: no CUDA device is visible to this process (this torch build or "
            "machine has none); use --device cpu"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise SettingError(
            f"--device cuda: local rank {local_rank} needs a GPU of its own, {count} visible "
            "(start at most one worker per GPU on each machine)"
        )
    return torch.device("cuda", local_rank)


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` moved to ``device`` (nothing moves when it is there: a CPU run copies nothing,
    memory-mapped tables stay mapped)."""
    if model_device(model) == device:
        return model
    return model.to(device)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU for an empty module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """``batch`` on ``device`` (the same object when it is there already)."""
    if batch.labels.device == device:
        return batch
    return Batch(
        dense=batch.dense.to(device, non_blocking=True),
        sparse=batch.sparse.to(device, non_blocking=True),
        labels=batch.labels.to(device, non_blocking=True),
    )


def follow_model(
    fn: Callable[[nn.Module, Batch], torch.Tensor], device: torch.device
) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """``fn`` (a loss) called with the batch moved to ``device``; ``fn`` itself on the CPU."""
    if device.type == "cpu":
        return fn
    return lambda model, batch: fn(model, batch_to(batch, device))


def scores_on_cpu(
    fn: Callable[[nn.Module, Batch], torch.Tensor], device: torch.device
) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """``fn`` (a score) on batches moved to ``device``, its result back on the CPU; ``fn`` itself
    on the CPU."""
    if device.type == "cpu":
        return fn
    return lambda model, batch: fn(model, batch_to(batch, device)).cpu()
