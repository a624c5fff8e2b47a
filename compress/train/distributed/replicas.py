"""Are the replicas still identical? A digest of a model's state, compared across ranks.

Every rank applies the same summed gradient with the same optimizer, so the replicas (weights,
optimizer-independent buffers such as a table-wise QAT table's scale, refreshed from ``max|W|``
on each rank) stay bit-identical by construction. The loop checks it at every evaluation and at
the end of training: each rank hashes its state (:func:`digest`) and the ranks compare; a
difference stops the run with one line naming the first tensor that differs, instead of rank 0
silently writing a model the other ranks did not train.

The digest reads the bits: every float tensor viewed as integers and summed twice (plainly, and
weighted by position modulo a prime) in int64, so any single changed bit changes it, and it is
the same on every machine.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.io.table_stream import row_chunks

_MODULUS = 65521  # a prime below 2^16: position weights stay small
#: Elements digested at a time (32 MB of int64 temporaries).
CHUNK = 1 << 22
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_digest(t: torch.Tensor, chunk: int = CHUNK) -> tuple[int, int]:
    """Two int64 sums of ``t``'s bits (element-wise integers of its own width), read ``chunk``
    values at a time (:func:`compress.io.table_stream.row_chunks`: a table mapped from the
    checkpoint is read from its file and the rows this process wrote, never mapped whole)."""
    t = t.detach()
    flat = t.reshape(-1) if t.dim() < 2 else t.reshape(t.shape[0], -1)
    width = 1 if flat.dim() == 1 else flat.shape[1]
    plain = weighted = 0
    for start, _, rows in row_chunks(flat, max(1, chunk // max(1, width))):
        values = rows.reshape(-1)
        if values.is_floating_point():
            values = values.contiguous().view(_INT_OF_WIDTH[values.element_size()])
        ints = values.to(torch.int64)
        first = start * width
        pos = torch.arange(first, first + ints.numel(), device=ints.device, dtype=torch.int64)
        # int64 sums wrap around on overflow, identically on every rank
        plain = (plain + int(ints.sum())) % 2**64
        weighted = (weighted + int((ints * (pos % _MODULUS + 1)).sum())) % 2**64
    return plain, weighted


def digest(model: nn.Module) -> list[list[int]]:
    """``[[sum, weighted sum], ...]`` of every tensor in ``model.state_dict()``, in key order."""
    return [list(tensor_digest(v)) for v in model.state_dict().values() if torch.is_tensor(v)]


def first_difference(model: nn.Module, mine: list, theirs: list) -> str | None:
    """The state-dict key of the first tensor whose digests differ (``None``: none differs)."""
    keys = [k for k, v in model.state_dict().items() if torch.is_tensor(v)]
    for key, a, b in zip(keys, mine, theirs, strict=False):
        if list(a) != list(b):
            return key
    if len(mine) != len(theirs):
        return "(the number of tensors)"
    return None
