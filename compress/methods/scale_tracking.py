"""Exact ``max|W|`` of a table under sparse updates, without rescanning the table.

DQRM's table-wise scale is ``max|W| / (2^(b-1) - 1)``, refreshed every P steps. The rescan reads the
whole table (on CPU ~20 ms for 10M x 16 FP32, memory-bound); at P=200 that costs more per step than
the rest of a QAT step. Sparse optimizers change only the rows of the gradient, so a summary kept
up to date with those rows gives the same maximum for far less reading:

- rows are grouped in blocks of :data:`BLOCK_ROWS`; each block keeps its maximum ``bmax``, the row
  ``barg`` that holds it, and a ``dirty`` flag;
- after a step, each changed row is folded in (:meth:`BlockAbsmax.update`): a row at least the
  block's maximum becomes it; the row that held the maximum, if now smaller, leaves ``bmax`` as an
  upper bound and marks the block dirty. The summary is small (9 bytes a block: ~350 KB for 10M
  rows), so these updates hit the CPU cache, and the rows were just written by the optimizer;
- :meth:`BlockAbsmax.maximum` rescans only the dirty blocks (a few percent of the table), then takes
  the maximum of ``bmax``. The result equals ``max|W|`` exactly (NaN when the table holds NaN).

The arithmetic runs in the compiled kernels of :mod:`compress.quant.native`; without them there is no
summary and refreshes rescan the table (see :func:`compress.methods.qat_embedding.track_scale_updates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.quant import native

BLOCK_ROWS = 256
"""Rows a block: small enough that a dirty block is cheap to rescan, large enough that the summary
(``R / 256`` entries) stays in the CPU cache."""


@dataclass
class BlockAbsmax:
    """Block summary of ``max|W|`` for one ``[R, D]`` float32 table (see the module docstring)."""

    block: int
    bmax: torch.Tensor
    barg: torch.Tensor
    dirty: torch.Tensor

    @classmethod
    def build(cls, w: torch.Tensor, block: int = BLOCK_ROWS) -> BlockAbsmax:
        """Summarize every block of ``w`` (one pass over the table)."""
        return cls(block, *native.blocks_build(w.detach(), block))

    def update(self, w: torch.Tensor, ids: torch.Tensor) -> None:
        """Fold the rows ``ids`` of ``w``, which just changed, into the summary."""
        native.blocks_update(w.detach(), self.block, ids, (self.bmax, self.barg, self.dirty))

    def maximum(self, w: torch.Tensor) -> float:
        """``max|w|``, exactly: rescan the dirty blocks, then the largest block maximum."""
        native.blocks_rescan(w.detach(), self.block, (self.bmax, self.barg, self.dirty))
        return float(self.bmax.max()) if self.bmax.numel() else 0.0
