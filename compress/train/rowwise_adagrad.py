"""Row-wise Adagrad for embedding tables: FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, on sparse gradients.

TorchRec's default embedding optimizer keeps **one accumulator per row** instead of one per
element (1/dim of element-wise Adagrad's state). For each row ``r`` of the (summed) gradient ``g``
of a step::

    state[r] += mean(g[r]**2)                       # the mean over the row's D elements
    w[r]     -= g[r] * lr / (sqrt(state[r]) + eps)

with ``state`` starting at zero and ``eps`` 1e-8 by default. Rows absent from the gradient are not
touched, neither their weight nor their state, so the optimizer changes only the gradient's rows
(table-wise QAT scales stay exact under it, :func:`compress.methods.qat_embedding.
updates_only_gradient_rows`).

The arithmetic is FBGEMM's CPU path for float32 tables, step by step in float32, so the weights and
states equal FBGEMM's bit for bit (``tests/test_rowwise_adagrad.py`` runs FBGEMM's
``SplitTableBatchedEmbeddingBagsCodegen`` with ``EmbOptimType.EXACT_ROWWISE_ADAGRAD`` on the CPU
next to it). In the pytorch/FBGEMM sources (tag v1.8.0, the fbgemm-gpu-cpu version pinned here;
line numbers at that tag):

- ``fbgemm_gpu/codegen/genscript/optimizers.py``, ``rowwise_adagrad()`` (line 120; CPU update,
  lines 240-268): ``g_avg_square = g_local_sum_square / D``; ``new_sum_square_grads =
  momentum1[idx] + g_avg_square``; ``multiplier = learning_rate / (sqrtf(new_sum_square_grads) +
  eps)``; ``weight = correction * weight - grad * multiplier``, ``correction = 1.0`` without weight
  decay. ``momentum1`` is the per-row state (``split_optimizer_states()``), zero-initialized.
- ``fbgemm_gpu/codegen/training/backward/embedding_backward_split_cpu_template.cpp`` (line 148):
  for float32 weights and gradients of a table that serves one feature, the CPU backward sums
  each row's gradient over the batch, then calls ``fbgemm::GenerateSparseAdaGrad(D,
  /*rowwise=*/true)`` with ``eps`` and ``-learning_rate``.
- ``src/RefImplementations.cc``, ``rowwise_sparse_adagrad_ref`` (line 1857; the reference of that
  JIT kernel, ``src/SparseAdagrad.cc``): the squares are summed in 8 lanes (``partial_sum[j % 8]
  += g*g``), reduced as ``((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))`` and divided by
  ``D``; then ``h += sum``, ``step = lr / (sqrt(h) + eps)`` (``lr`` negative) and ``w += g *
  step``, without fused multiply-adds (``vmulps``, ``vaddps``). :func:`row_mean_squares` keeps
  that order.
- ``fbgemm_gpu/fbgemm_gpu/split_table_batched_embeddings_ops_training.py`` (line 662):
  ``SplitTableBatchedEmbeddingBagsCodegen(..., eps: float = 1.0e-8)``.

(A table shared by several features goes through the template's generic loop, which sums the
squares in one sequential pass: the same formula, within float32 rounding for ``D > 2``.)

A parameter's rows are its first dimension; each row's elements are the rest (a one-dimensional
parameter, such as a shared ROBE-Z array, has one accumulator per element). Dense gradients are
taken too (every row is a gradient row; rows whose gradient is zero do not move).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: FBGEMM's default ``eps`` for split table-batched embeddings (and so TorchRec's fused optimizer).
DEFAULT_EPS = 1e-8
#: The lanes FBGEMM's kernel sums squares in (one AVX2 register of float32).
LANES = 8


def row_mean_squares(values: torch.Tensor) -> torch.Tensor:
    """``[N]`` mean of the squares of each row of ``values [N, D]``, summed in FBGEMM's order.

    Lane ``j % 8`` accumulates ``values[:, j]**2`` in ascending ``j``; the lanes are added as a
    tree, ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``, and the sum divided by ``D``, all
    in the dtype of ``values`` (see the module docstring).
    """
    n, dim = values.shape
    squares = values * values
    lanes = torch.zeros(n, LANES, dtype=values.dtype, device=values.device)
    for start in range(0, dim, LANES):
        chunk = squares[:, start : start + LANES]
        lanes[:, : chunk.shape[1]] += chunk
    pairs = lanes[:, 0::2] + lanes[:, 1::2]  # (l0+l1), (l2+l3), (l4+l5), (l6+l7)
    quads = pairs[:, 0::2] + pairs[:, 1::2]
    return (quads[:, 0] + quads[:, 1]) / dim


def summed_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, values)`` of a sparse COO gradient with one sparse dimension: its distinct rows in
    ascending order and each one's summed gradient ``[n, ...]``.

    Duplicates are added in the order they occur in the gradient (``index_add_`` is sequential on
    the CPU), as FBGEMM's backward adds a row's bags in batch order; ``coalesce()`` adds them in an
    order of its own, which can differ in the last bit. An already coalesced gradient is used as
    it is.
    """
    if grad.is_coalesced():
        return grad._indices()[0], grad._values()
    ids, values = grad._indices()[0], grad._values()
    rows, where = torch.unique(ids, sorted=True, return_inverse=True)
    summed = torch.zeros(
        (rows.numel(), *values.shape[1:]), dtype=values.dtype, device=values.device
    )
    return rows, summed.index_add_(0, where, values)


def correctly_rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` rounded once to ``x``'s dtype, as the ``sqrtss`` instruction FBGEMM uses.

    For float32 the root is taken in float64 and rounded: float64 carries more than twice
    float32's precision plus two bits, so the double rounding is exact.
    """
    if x.dtype == torch.float32:
        return x.double().sqrt_().to(torch.float32)
    return x.sqrt()


class RowwiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad (FBGEMM ``EXACT_ROWWISE_ADAGRAD``) over sparse or dense gradients.

    Args:
        params: parameters (tables ``[R, D]``) or parameter groups.
        lr: learning rate (>= 0).
        eps: added to ``sqrt(state)`` in the denominator (>= 0; FBGEMM's default 1e-8).

    State per parameter: ``"sum"``, one accumulator per row (``[R]``, the parameter's dtype),
    created at construction so that :meth:`state_dict` is complete before the first step.

    Example::

        >>> emb = torch.nn.Embedding(10, 4, sparse=True)
        >>> opt = RowwiseAdagrad(emb.parameters(), lr=0.1)
        >>> emb(torch.tensor([1, 3])).sum().backward()
        >>> _ = opt.step()
        >>> opt.state[emb.weight]["sum"].shape
        torch.Size([10])
    """

    def __init__(self, params: Any, lr: float = 0.01, eps: float = DEFAULT_EPS) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr!r} (must be >= 0)")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps {eps!r} (must be >= 0)")
        super().__init__(params, {"lr": lr, "eps": eps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() == 0:
                    raise ValueError("row-wise Adagrad needs parameters with rows, got a scalar")
                self.state[p]["sum"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a saved state, then check that every accumulator has one entry per row.

        Raises:
            ValueError: an accumulator missing, or of another shape than the parameter's rows.
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                state = self.state.get(p, {})
                acc = state.get("sum")
                if not isinstance(acc, torch.Tensor) or tuple(acc.shape) != (p.shape[0],):
                    shape = None if not isinstance(acc, torch.Tensor) else tuple(acc.shape)
                    raise ValueError(
                        f"row-wise Adagrad state of parameter {i} has shape {shape}, "
                        f"expected ({p.shape[0]},)"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    rowwise_adagrad_update(
                        p, p.grad, self.state[p]["sum"], lr=group["lr"], eps=group["eps"]
                    )
        return loss


def rowwise_adagrad_update(
    param: torch.Tensor, grad: torch.Tensor, state: torch.Tensor, *, lr: float, eps: float
) -> None:
    """Apply one row-wise Adagrad step to ``param`` (in place) and its row ``state`` ``[R]``.

    ``grad`` is dense (the shape of ``param``) or sparse COO with one sparse dimension (rows);
    duplicate rows of a sparse gradient are summed first. Only the gradient's rows change.
    """
    if grad.is_sparse:
        if grad.sparse_dim() != 1:
            raise ValueError(
                f"row-wise Adagrad takes sparse gradients over rows (sparse_dim 1), "
                f"got sparse_dim {grad.sparse_dim()}"
            )
        rows, values = summed_rows(grad)
    else:
        rows, values = None, grad
    n = values.shape[0]
    if n == 0:
        return
    flat = values.reshape(n, -1)
    mean_sq = row_mean_squares(flat)
    if rows is None:
        state.add_(mean_sq)
        acc = state
    else:
        acc = state.index_select(0, rows).add_(mean_sq)
        state.index_copy_(0, rows, acc)
    # in the accumulator's dtype, as FBGEMM: python scalars would make `lr / t` a reciprocal
    # times lr, and torch's vectorized float32 sqrt is not always correctly rounded (about 0.5% of
    # values one ulp off, on AVX-512 builds), so it is taken in float64 and rounded once
    lr_t = torch.tensor(lr, dtype=acc.dtype, device=acc.device)
    eps_t = torch.tensor(eps, dtype=acc.dtype, device=acc.device)
    step = torch.div(lr_t, correctly_rounded_sqrt(acc).add_(eps_t)).neg_()
    update = (flat * step[:, None]).reshape(values.shape)
    if rows is None:
        param.add_(update)
    else:
        param.index_add_(0, rows, update)
