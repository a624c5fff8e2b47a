"""Reading a shared ROBE-Z array block by block, with sparse (or dense) gradients.

A row of a virtual table reads ``ceil(D / Z)`` blocks of ``Z`` contiguous cells
(:mod:`compress.methods.robe.hashing`). :func:`gather_blocks` reads them as rows of an overlapping
strided view (no ``[N, D]`` index is built); :class:`_BlockGather` / :func:`gather_cells` add a
gradient w.r.t. the 1-D array that is sparse COO (the cells a batch touched) or dense ``[M]``.
"""

from __future__ import annotations

import torch

from compress.methods.robe.hashing import block_cells


def gather_blocks(
    array: torch.Tensor, starts: torch.Tensor, dim: int, block_size: int
) -> torch.Tensor:
    """float ``[N, D]``: the cells of block starts ``[N, ceil(D / Z)]`` (no autograd).

    Reads each block as one row of the overlapping ``[|M| - Z + 1, Z]`` strided view of ``array``,
    so no ``[N, D]`` index is built.
    """
    n, n_blocks = starts.shape
    rows = array.as_strided((array.numel() - block_size + 1, block_size), (1, 1))
    out = rows.index_select(0, starts.reshape(-1)).view(n, n_blocks * block_size)
    return out[:, :dim] if n_blocks * block_size != dim else out


DENSE_COALESCE_RATIO = 32
"""Sum a sparse gradient in a dense ``[M]`` buffer (coalescing it) when ``M <= ratio * nnz``."""


class _CoalescedGrad:
    """The values of the last coalesced gradient made by :class:`_BlockGather`, until autograd
    stores it in ``.grad`` (see :meth:`RobeEmbeddingBagCollection._restore_coalesced`)."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None


def sparse_cell_gradient(cells: torch.Tensor, grad: torch.Tensor, size: int) -> torch.Tensor:
    """Sparse COO ``[size]`` gradient: ``grad`` [nnz] added at ``cells`` [nnz].

    When the array is not much larger than the number of entries (``size <= DENSE_COALESCE_RATIO
    * nnz``) the entries are summed in a dense buffer and returned coalesced (sorted, unique), in
    ``O(size + nnz)``; otherwise they are returned as they are (uncoalesced, ``O(nnz)``).
    """
    if size > DENSE_COALESCE_RATIO * cells.numel():
        return torch.sparse_coo_tensor(
            cells.unsqueeze(0), grad, (size,), is_coalesced=False, check_invariants=False
        )
    dense = grad.new_zeros(size).index_add_(0, cells, grad)
    hit = torch.zeros(size, dtype=torch.bool, device=cells.device)
    hit[cells] = True
    touched = hit.nonzero().reshape(1, -1)  # sorted, unique
    return torch.sparse_coo_tensor(
        touched, dense[touched[0]], (size,), is_coalesced=True, check_invariants=False
    )


class _BlockGather(torch.autograd.Function):
    """:func:`gather_blocks` whose gradient w.r.t. the 1-D array is sparse COO or dense ``[M]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        weight: torch.Tensor,
        starts: torch.Tensor,
        dim: int,
        block_size: int,
        sparse: bool,
        tracker: _CoalescedGrad | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(starts)
        ctx.settings = (weight.shape[0], dim, block_size, sparse, tracker)
        return gather_blocks(weight, starts, dim, block_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (starts,) = ctx.saved_tensors
        size, dim, block_size, sparse, tracker = ctx.settings
        cells = block_cells(starts, dim, block_size).reshape(-1)
        values = grad.reshape(-1)
        if sparse:
            g = sparse_cell_gradient(cells, values, size)
            if tracker is not None and g.is_coalesced():
                tracker.values = g._values()
        else:
            g = values.new_zeros(size).index_add_(0, cells, values)
        return g, None, None, None, None, None


def gather_cells(
    weight: torch.Tensor,
    starts: torch.Tensor,
    dim: int,
    block_size: int,
    sparse: bool = True,
) -> torch.Tensor:
    """float ``[N, D]`` read from the 1-D ``weight`` at block starts ``[N, ceil(D / Z)]``.

    The gradient w.r.t. ``weight`` is a sparse COO ``[M]`` tensor (``sparse=True``) or dense.
    """
    return _BlockGather.apply(weight, starts, dim, block_size, sparse, None)
