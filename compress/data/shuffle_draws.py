"""The draws of the seeded shuffle buffers: which rows a full buffer hands on when a block arrives.

Both buffers (:class:`~compress.data.row_batches.ShuffleBuffer` for one-hot rows and
:class:`~compress.data.jagged_rows.JaggedShuffleBuffer` for multi-hot rows) take these draws from
the same ``rng`` in the same order, so the same seed gives the same order of rows in either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Overflow:
    """A buffer holding ``n`` of ``cap`` rows receives a block of ``m`` with ``n + m > cap``: it
    hands on ``n + m - cap`` rows drawn from both together, in drawn order.

    Of the handed rows, those at positions ``at_buffer`` are the buffer's slots ``buffer_rows``
    and those at ``at_block`` are the block's rows ``block_rows``; the block's rows ``stay`` that
    are not handed on fill the buffer's ``slots`` (the places freed, then the free end)."""

    count: int
    at_buffer: np.ndarray
    at_block: np.ndarray
    buffer_rows: np.ndarray
    block_rows: np.ndarray
    slots: np.ndarray
    stay: np.ndarray


def draw_overflow(rng: np.random.Generator, n: int, m: int, cap: int) -> Overflow:
    """The rows handed on when ``m`` rows arrive at a buffer holding ``n`` of ``cap`` (one
    ``rng.choice`` draw; ``n + m > cap``)."""
    chosen = rng.choice(n + m, size=n + m - cap, replace=False)
    from_buffer = chosen < n
    at_buffer, at_block = np.flatnonzero(from_buffer), np.flatnonzero(~from_buffer)
    buffer_rows, block_rows = chosen[at_buffer], chosen[at_block] - n
    taken = np.zeros(m, dtype=bool)
    taken[block_rows] = True
    slots = np.concatenate([buffer_rows, np.arange(n, cap)])
    stay = np.flatnonzero(~taken)
    return Overflow(int(chosen.size), at_buffer, at_block, buffer_rows, block_rows, slots, stay)
