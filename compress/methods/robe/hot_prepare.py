"""Prepare a sharing group with hot rows: choose the split, take the hot rows, project the tail.

:func:`prepare_hot_group` is what :meth:`compress.methods.robe.method.RobeMethod.prepare_group`
runs for a group whose rule sets ``hot_rows``: the number of hot rows (fixed, or ``"auto"``: the
split of least frequency-weighted reconstruction error, :mod:`compress.methods.robe.hot_rows`),
the hot rows (the most frequent in ``--data``) with their trained values, and the array of the
cells left, initialised by the least-squares projection of the other rows only
(:mod:`compress.methods.robe.projection`, hot rows weighted 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compress.errors import RecipeError
from compress.io.model_spec import TableSpec
from compress.methods.robe.array import ArrayQuantization
from compress.methods.robe.hashing import DEFAULT_SEED
from compress.methods.robe.hot_rows import (
    AUTO,
    choose_hot_rows,
    exact_hot_rows,
    max_hot_rows,
    split_budget,
)
from compress.methods.robe.hot_tables import (
    SplitErrors,
    hot_ids_and_values,
    rank_rows,
    seen_rows,
    tail_weights,
)
from compress.methods.robe.module import RobeConfig, RobeEmbeddingBagCollection
from compress.methods.robe.projection import ProjectionReport, project_module


@dataclass(frozen=True)
class HotSettings:
    """What a group's plan says about its hot rows: ``hot_rows`` (int or ``"auto"``), their
    ``hot_dtype``, the group's byte ``budget`` and its array's ``array_dtype`` and ``block_size``."""

    hot_rows: int | str
    hot_dtype: str
    budget: int
    array_dtype: str
    block_size: int
    weighted: bool  # projection = "frequency"


@dataclass(frozen=True)
class HotChoice:
    """The split a group was prepared with: ``hot_rows`` and the array's ``cells``; ``coverage``
    the share of the data's lookups the hot rows serve; for ``"auto"`` the frequency-weighted
    RMSE of the chosen split and of none (over the rows the data reads) and how many splits were
    evaluated."""

    hot_rows: int
    cells: int
    coverage: float
    weighted_rmse: float = math.nan
    weighted_rmse_without: float = math.nan
    evaluated: int = 0


def prepare_hot_group(
    name: str,
    tables: Sequence[tuple[TableSpec, torch.Tensor]],
    counts: Sequence[torch.Tensor] | None,
    settings: HotSettings,
    chunk_rows: int,
    sparse: bool,
) -> tuple[RobeEmbeddingBagCollection, ProjectionReport, HotChoice]:
    """The group's module (array projected from the tail, hot rows set), its projection report
    and the split chosen. ``counts``: each table's row counts in ``--data`` (``None``: no data;
    then ``"auto"`` keeps no hot row and a fixed count is a :class:`RecipeError`)."""
    s = settings
    specs = [t for t, _ in tables]
    rows_total, dim = sum(t.num_embeddings for t in specs), specs[0].embedding_dim
    config = RobeConfig(array_size=s.block_size, block_size=s.block_size, seed=DEFAULT_SEED)
    quant = None if s.array_dtype == "fp32" else ArrayQuantization(precision=s.array_dtype)
    evaluated: dict[int, float] = {}
    seen = None
    if counts is None:
        if s.hot_rows != AUTO:
            raise RecipeError(
                f"shared array {name}: hot_rows = {s.hot_rows} keeps the rows --data reads most "
                'often, and no --data was given (give --data, or hot_rows = "auto", which keeps '
                "none without it)"
            )
        hot_rows = 0
    elif s.hot_rows == AUTO:
        seen = seen_rows(tables, counts, s.hot_dtype)
        upper = min(
            max_hot_rows(s.budget, rows_total, dim, s.array_dtype, s.hot_dtype, s.block_size),
            int(seen.ids.numel()),
        )
        candidates = exact_hot_rows(s.budget, rows_total, dim, s.array_dtype, s.hot_dtype, upper)
        errors = SplitErrors(
            seen,
            lambda n: _split(s, n, rows_total, dim).cells,
            s.block_size,
            config.constants,
            quant,
        )
        hot_rows, evaluated = choose_hot_rows(errors, candidates)
    else:
        hot_rows = int(s.hot_rows)
    split = _split(s, hot_rows, rows_total, dim)
    config = RobeConfig(array_size=split.cells, block_size=s.block_size, seed=DEFAULT_SEED)
    coverage = 0.0
    if hot_rows:
        ids, values = hot_ids_and_values(tables, rank_rows(counts), hot_rows)
        weights = tail_weights(tables, counts if s.weighted else None, ids)
        flat = torch.cat([c.reshape(-1).to(torch.float64) for c in counts])
        coverage = float(flat[ids].sum() / flat.sum().clamp_min(1.0))
    else:
        weights = [c.double() for c in counts] if s.weighted and counts is not None else None
    module, report = project_module(
        tables, config, row_weights=weights, chunk_rows=chunk_rows, sparse=sparse
    )
    if quant is not None:
        module.set_quantization(quant)
    if hot_rows:
        module.set_hot_rows(ids, values, s.hot_dtype)
    choice = HotChoice(hot_rows, split.cells, coverage, evaluated=len(evaluated))
    if evaluated and seen is not None and seen.total_weight > 0:
        total = seen.total_weight
        choice = HotChoice(
            hot_rows,
            split.cells,
            coverage,
            math.sqrt(evaluated[hot_rows] / total),
            math.sqrt(evaluated[0] / total) if 0 in evaluated else math.nan,
            len(evaluated),
        )
    return module, report, choice


def _split(s: HotSettings, hot_rows: int, rows_total: int, dim: int):  # noqa: ANN202 - HotSplit
    try:
        return split_budget(
            s.budget, hot_rows, rows_total, dim, s.array_dtype, s.hot_dtype, s.block_size
        )
    except ValueError as e:
        raise RecipeError(f"hot rows: {e}") from None
