"""Post-hoc conversion of trained tables into a ROBE-Z shared array (least-squares projection).

Each virtual element ``(t, i, d)`` reads exactly one cell ``M[h(t, i, d)]``, so the (weighted)
squared reconstruction error ``sum w_ti * (W_t[i, d] - M[h(t, i, d)])**2`` separates by cell and is
minimized by setting each cell to the (weighted) mean of the trained values that hash to it. (The
ROBE-Z papers, arXiv 2207.10731 and 2108.02191, train the array from scratch; converting trained
tables is this project's addition.) Cells no value hits, or only values of weight 0, get 0.

Rows are processed in chunks (``chunk_rows``, default 262,144) so a 10M x 16 table never builds
an index tensor for all its elements at once; sums accumulate in float64 with ``index_add_``. A
memory-mapped table is read from its file chunk by chunk (:func:`compress.io.table_stream.row_chunks`),
so the projection never maps its pages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compress.io.model_spec import TableSpec
from compress.io.table_stream import row_chunks
from compress.methods.robe.hashing import robe_indices
from compress.methods.robe.module import (
    RobeConfig,
    RobeEmbeddingBagCollection,
    table_offsets,
    validate_sharing,
)

DEFAULT_CHUNK_ROWS = 262_144


@dataclass(frozen=True)
class ProjectionReport:
    """Summary of one projection.

    ``values`` virtual elements were projected onto ``array_size`` cells, of which ``cells_hit``
    received at least one; ``values_per_cell`` is ``values / cells_hit``. ``rmse`` is the root mean
    squared reconstruction error over all elements, ``weighted_rmse`` the same weighted by
    ``row_weights`` (equal to ``rmse`` without them); both ``nan`` when not computed.
    """

    array_size: int
    values: int
    cells_hit: int
    values_per_cell: float
    rmse: float
    weighted_rmse: float

    def __str__(self) -> str:
        return (
            f"{self.values} values -> {self.array_size} cells ({self.cells_hit} hit, "
            f"{self.values_per_cell:.2f} values a hit cell), rmse {self.rmse:.4g}, "
            f"weighted rmse {self.weighted_rmse:.4g}"
        )


def _check_inputs(
    tables: Sequence[tuple[TableSpec, torch.Tensor]],
    row_weights: Sequence[torch.Tensor | None] | None,
) -> list[torch.Tensor | None]:
    for spec, w in tables:
        want = (spec.num_embeddings, spec.embedding_dim)
        if tuple(w.shape) != want:
            raise ValueError(f"table {spec.name!r}: weight shape {tuple(w.shape)}, expected {want}")
    if row_weights is None:
        return [None] * len(tables)
    if len(row_weights) != len(tables):
        raise ValueError(f"{len(row_weights)} row_weights given for {len(tables)} tables")
    out: list[torch.Tensor | None] = []
    for (spec, _), rw in zip(tables, row_weights, strict=True):
        if rw is not None:
            rw = torch.as_tensor(rw).reshape(-1).to(torch.float64)
            if rw.numel() != spec.num_embeddings:
                raise ValueError(
                    f"table {spec.name!r}: {rw.numel()} row weights for {spec.num_embeddings} rows"
                )
            if not bool(torch.isfinite(rw).all()) or bool((rw < 0).any()):
                raise ValueError(f"table {spec.name!r}: row weights must be finite and >= 0")
        out.append(rw)
    return out


def project_tables(
    tables: Sequence[tuple[TableSpec, torch.Tensor]],
    array_size: int,
    block_size: int,
    constants: tuple[int, int, int],
    row_weights: Sequence[torch.Tensor | None] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    compute_error: bool = True,
) -> tuple[torch.Tensor, ProjectionReport]:
    """Least-squares ROBE-Z array for trained tables.

    Args:
        tables: ``(spec, weight [rows, D])`` per table, in sharing order (table offsets follow it).
        array_size: ``|M|``.
        block_size: ``Z``.
        constants: ``(R1, R2, R3)``.
        row_weights: optional, one per table: float ``[rows]`` (e.g. access counts, ``>= 0``) or
            ``None`` for uniform weight 1.
        chunk_rows: rows hashed at a time.
        compute_error: make a second pass for the report's RMSEs (else they are ``nan``).

    Returns:
        ``(weight, report)``: float32 ``[array_size]`` and a :class:`ProjectionReport`.

    Example::

        >>> spec = TableSpec("t", 100, 4, ("f",))
        >>> m, rep = project_tables([(spec, torch.randn(100, 4))], 50, 2, robe_constants())
        >>> m.shape, rep.values
        (torch.Size([50]), 400)
    """
    specs = [s for s, _ in tables]
    validate_sharing(specs, array_size, block_size)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    weights = _check_inputs(tables, row_weights)
    offsets = table_offsets(specs)
    dim = specs[0].embedding_dim
    weighted = any(w is not None for w in weights)

    num = torch.zeros(array_size, dtype=torch.float64)
    den = torch.zeros(array_size, dtype=torch.float64)
    counts = torch.zeros(array_size, dtype=torch.int32) if weighted else None
    for (_, table), offset, rw in zip(tables, offsets, weights, strict=True):
        for start, end, rows in row_chunks(table, chunk_rows):
            ids = torch.arange(start, end, dtype=torch.int64)
            idx = robe_indices(ids, offset, dim, block_size, array_size, constants).view(-1)
            vals = rows.to(torch.float64)  # [c, D]
            if rw is None:
                num.index_add_(0, idx, vals.reshape(-1))
                den.index_add_(0, idx, torch.ones(1, dtype=torch.float64).expand(idx.numel()))
            else:
                w = rw[start:end].unsqueeze(1).expand(-1, dim)
                num.index_add_(0, idx, (vals * w).reshape(-1))
                den.index_add_(0, idx, w.reshape(-1))
            if counts is not None:
                counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
    hit = int((counts > 0).sum()) if counts is not None else int((den > 0).sum())
    array = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    array = array.to(torch.float32)

    n_values = sum(s.num_embeddings for s in specs) * dim
    rmse = wrmse = math.nan
    if compute_error:
        rmse, wrmse = _reconstruction_rmse(
            tables, weights, offsets, array, block_size, constants, chunk_rows
        )
    report = ProjectionReport(
        array_size=array_size,
        values=n_values,
        cells_hit=hit,
        values_per_cell=n_values / hit if hit else math.inf,
        rmse=rmse,
        weighted_rmse=wrmse,
    )
    return array, report


def _reconstruction_rmse(
    tables: Sequence[tuple[TableSpec, torch.Tensor]],
    weights: Sequence[torch.Tensor | None],
    offsets: Sequence[int],
    array: torch.Tensor,
    block_size: int,
    constants: tuple[int, int, int],
    chunk_rows: int,
) -> tuple[float, float]:
    """``(rmse, weighted rmse)`` of reading the trained values back from ``array`` [M]."""
    sq = wsq = wsum = 0.0
    count = 0
    dim = tables[0][0].embedding_dim
    for (_, table), offset, rw in zip(tables, offsets, weights, strict=True):
        for start, end, rows in row_chunks(table, chunk_rows):
            ids = torch.arange(start, end, dtype=torch.int64)
            idx = robe_indices(ids, offset, dim, block_size, array.numel(), constants)
            err = (rows.to(torch.float64) - array[idx].double()).pow(2)
            row_sq = err.sum(dim=1)  # [c]
            sq += float(row_sq.sum())
            count += err.numel()
            if rw is None:
                wsq += float(row_sq.sum())
                wsum += float(err.numel())
            else:
                wsq += float((row_sq * rw[start:end]).sum())
                wsum += float(rw[start:end].sum()) * dim
    rmse = math.sqrt(sq / count) if count else 0.0
    wrmse = math.sqrt(wsq / wsum) if wsum > 0 else math.nan
    return rmse, wrmse


def project_module(
    tables: Sequence[tuple[TableSpec, torch.Tensor]],
    config: RobeConfig,
    row_weights: Sequence[torch.Tensor | None] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    sparse: bool = True,
) -> tuple[RobeEmbeddingBagCollection, ProjectionReport]:
    """A :class:`RobeEmbeddingBagCollection` (sparse or dense array gradients) whose array is the
    projection of ``tables``."""
    array, report = project_tables(
        tables,
        config.array_size,
        config.block_size,
        config.constants,
        row_weights=row_weights,
        chunk_rows=chunk_rows,
    )
    module = RobeEmbeddingBagCollection([s for s, _ in tables], config, sparse=sparse)
    with torch.no_grad():
        module.weight.copy_(array)
    return module, report
