"""One step's embedding message: the layout of the bytes a rank sends for its sparse gradients.

The tables (more exactly the parameters with a sparse gradient, in parameter order) are grouped
by row size (``dim``); a message holds one **block** per group with the rows this rank's share of
the batch touched in the group's tables, table after table, each table's rows ascending: their ids
(the table's own row numbers) and their summed gradients, either float32 (``embedding_grad_bits =
32``, exact) or INT8 codes with one float32 scale per row (``8``;
:mod:`compress.train.distributed.grad_codec`). It is one uint8 tensor made of typed views, nothing
converted on the way::

    block of group 0:  [ids]      int32 (int64 when a table has 2^31 rows or more)
                       [scales]   float32, one per row, 8-bit only
                       [values]   int8 codes [n, dim], or float32 values [n, dim]
                       [0-7 zero bytes: the next block starts on 8 bytes]
    block of group 1:  ...

How many rows each rank sends for each table travels first, in the step's header
(:mod:`compress.train.distributed.grad_exchange`), so every rank can cut every other rank's
message without being told more. Bytes per touched row: ``4 + 4 + dim`` at 8 bits, ``4 + 4 * dim``
at 32 (plus at most 7 bytes of padding a block). Rows of one value (a parameter with one
dimension, such as a large shared ROBE-Z array) always travel as float32: with a scale per row,
INT8 would take more bytes than the value itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compress.train.distributed.grad_codec import dequantize_rows, quantize_rows

EMBEDDING_BITS = (8, 32)
_ALIGN = 8


@dataclass(frozen=True)
class SparseLayout:
    """How the sparse gradients of one model travel: the row size of each group (``dims``), the
    value width asked for (``bits``: 8 or 32; groups of one value a row use 32, :meth:`width`)
    and the id type."""

    dims: tuple[int, ...]
    bits: int
    id_dtype: torch.dtype = torch.int32

    def __post_init__(self) -> None:
        if self.bits not in EMBEDDING_BITS:
            raise ValueError(f"embedding gradient bits must be 8 or 32, got {self.bits}")

    def width(self, group: int) -> int:
        """The value width of group ``group``: ``bits``, except 32 for rows of one value."""
        return 32 if self.dims[group] == 1 else self.bits

    @property
    def id_bytes(self) -> int:
        return torch.empty(0, dtype=self.id_dtype).element_size()

    def row_bytes(self, group: int) -> int:
        """Bytes one row of group ``group`` takes: id, scale (8-bit) and values."""
        dim = self.dims[group]
        return self.id_bytes + (4 + dim if self.width(group) == 8 else 4 * dim)

    def block_bytes(self, group: int, rows: int) -> int:
        """Bytes of a block of ``rows`` rows of group ``group``, padding included."""
        return -(-rows * self.row_bytes(group) // _ALIGN) * _ALIGN

    def message_bytes(self, counts: Sequence[int]) -> int:
        """Bytes of a message holding ``counts[g]`` rows of group ``g``."""
        return sum(self.block_bytes(g, n) for g, n in enumerate(counts))

    def encode(self, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """uint8 message of ``(ids [n], values [n, dim])`` per group."""
        pieces = []
        for g, (ids, values) in enumerate(blocks):
            n = ids.numel()
            flat = values.reshape(n, self.dims[g])
            pieces.append(ids.to(self.id_dtype).contiguous().view(torch.uint8))
            if self.width(g) == 8:
                codes, scales = quantize_rows(flat)
                pieces.append(scales.contiguous().view(torch.uint8))
                pieces.append(codes.reshape(-1).view(torch.uint8))
            else:
                pieces.append(flat.float().contiguous().reshape(-1).view(torch.uint8))
            pad = self.block_bytes(g, n) - n * self.row_bytes(g)
            if pad:
                pieces.append(torch.zeros(pad, dtype=torch.uint8, device=ids.device))
        if not pieces:
            return torch.empty(0, dtype=torch.uint8)
        return torch.cat(pieces)

    def decode(
        self, message: torch.Tensor, counts: Sequence[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(ids int64 [n], values float32 [n, dim])`` per group of a message holding
        ``counts[g]`` rows of group ``g`` (dequantized at 8 bits)."""
        if any(n < 0 for n in counts):
            raise ValueError(f"embedding message announced with negative row counts {counts}")
        if message.numel() != self.message_bytes(counts):
            raise ValueError(
                f"embedding message of {message.numel()} bytes, {self.message_bytes(counts)} "
                "announced"
            )
        out = []
        at = 0
        for g, n in enumerate(counts):
            dim = self.dims[g]
            block = message[at : at + self.block_bytes(g, n)]
            at += block.numel()
            ids = block[: n * self.id_bytes].view(self.id_dtype).long()
            rest = block[n * self.id_bytes :]
            if self.width(g) == 8:
                scales = rest[: 4 * n].view(torch.float32)
                codes = rest[4 * n : 4 * n + n * dim].view(torch.int8).reshape(n, dim)
                out.append((ids, dequantize_rows(codes, scales)))
            else:
                out.append((ids, rest[: 4 * n * dim].view(torch.float32).reshape(n, dim)))
        return out
