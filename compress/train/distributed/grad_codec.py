"""INT8 codes for gradients on the wire, and a sparse gradient's coalesced rows.

Symmetric INT8: ``q = round(g / s)`` clamped to ``[-127, 127]``, ``s = max|g| / 127`` over a
group of values, decoded as ``q * s``. The group decides the error:

- :func:`quantize_rows`: one float32 scale per gradient row, for the embedding rows a batch touched
  (a row's scale follows that row's own magnitude; 4 bytes per row next to its ``dim`` codes);
- :func:`quantize_table`: one scale for all rows of a table, DQRM's choice (arXiv 2410.20046),
  kept for measuring the difference (``benchmarks/bench_distributed.py``);
- :func:`quantize_blocks`: one scale per :data:`BLOCK` consecutive values of the flattened dense
  (MLP) gradients, used with error feedback (:mod:`compress.train.distributed.grad_exchange`).

A group of zeros gets scale 0 and codes 0. The rounding is ``torch.round`` (half to even). All of
it is plain tensor arithmetic on the tensors' device.
"""

from __future__ import annotations

import torch

from compress.train.rowwise_adagrad import summed_rows

#: The largest code: symmetric INT8 leaves -128 unused, so ``-q`` is always a code.
QMAX = 127
#: Values per scale in :func:`quantize_blocks` (a float32 scale adds 4/256 = 1.6%).
BLOCK = 256


def coalesce(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, values)`` of a sparse COO gradient over rows: its distinct rows in ascending order
    (int64 ``[n]``) and each one's summed gradient ``[n, ...]`` (duplicates added in the order
    they occur, :func:`compress.train.rowwise_adagrad.summed_rows`)."""
    if grad.sparse_dim() != 1:
        raise ValueError(f"sparse gradients over rows have sparse_dim 1, got {grad.sparse_dim()}")
    return summed_rows(grad)


def _codes(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(values / safe).clamp_(-QMAX, QMAX).to(torch.int8)


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [n, D], scales float32 [n])`` of ``values [n, D]``: a scale per row."""
    values = values.float()
    scales = values.abs().amax(dim=1) / QMAX if values.shape[1] else values.new_zeros(len(values))
    return _codes(values, scales[:, None]), scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 ``[n, D]`` of :func:`quantize_rows`' output."""
    return codes.float() * scales[:, None]


def quantize_table(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [n, D], scale float32 [1])``: one scale for every value (DQRM's per table)."""
    values = values.float()
    scale = (values.abs().amax() / QMAX).reshape(1) if values.numel() else values.new_zeros(1)
    return _codes(values, scale), scale


def dequantize_table(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale


def blocks_of(flat: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """float32 ``[ceil(N / block), block]``: a 1-D ``flat`` cut into blocks, the last one padded
    with zeros (a copy)."""
    n = flat.numel()
    padded = flat.float().new_zeros(-(-n // block) * block)
    padded[:n] = flat
    return padded.view(-1, block)


def quantize_blocks(flat: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [N], scales float32 [ceil(N / block)])`` of a 1-D ``flat``: a scale per
    ``block`` consecutive values (the last block may be shorter)."""
    codes, scales = quantize_rows(blocks_of(flat, block))
    return codes.reshape(-1)[: flat.numel()], scales


def dequantize_blocks(
    codes: torch.Tensor, scales: torch.Tensor, block: int = BLOCK
) -> torch.Tensor:
    """float32 ``[N]`` of :func:`quantize_blocks`' output."""
    n = codes.numel()
    padded = codes.new_zeros(scales.numel() * block)
    padded[:n] = codes
    return dequantize_rows(padded.view(-1, block), scales).reshape(-1)[:n]
