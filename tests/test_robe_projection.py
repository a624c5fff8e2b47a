"""Tests for compress.methods.robe.projection: least-squares projection of trained tables onto an array."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from compress.errors import RecipeError
from compress.io.model_spec import TableSpec
from compress.methods.robe.hashing import robe_constants, robe_indices
from compress.methods.robe.module import RobeConfig
from compress.methods.robe.projection import project_module, project_tables

CONSTANTS = robe_constants()
DIM = 4
SPECS = (TableSpec("a", 60, DIM, ("fa",)), TableSpec("b", 45, DIM, ("fb",)))


def trained(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(s, torch.randn(s.num_embeddings, DIM, generator=g)) for s in SPECS]


def row_counts(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 20, (s.num_embeddings,), generator=g).double() for s in SPECS]


def cells(spec_index: int, m: int, z: int) -> torch.Tensor:
    offset = sum(s.num_embeddings for s in SPECS[:spec_index])
    spec = SPECS[spec_index]
    return robe_indices(torch.arange(spec.num_embeddings), offset, DIM, z, m, CONSTANTS)


def weighted_sq_error(tables, weights, array, z) -> float:
    total = 0.0
    for i, (_, w) in enumerate(tables):
        err = (w.double() - array.double()[cells(i, array.numel(), z)]).pow(2).sum(1)
        total += float((err * (weights[i] if weights else 1.0)).sum())
    return total


def brute_force(tables, weights, m, z) -> torch.Tensor:
    num, den = defaultdict(float), defaultdict(float)
    for i, (_, w) in enumerate(tables):
        idx = cells(i, m, z)
        for r in range(w.shape[0]):
            rw = float(weights[i][r]) if weights else 1.0
            for d in range(DIM):
                num[int(idx[r, d])] += rw * float(w[r, d])
                den[int(idx[r, d])] += rw
    return torch.tensor([num[k] / den[k] if den[k] > 0 else 0.0 for k in range(m)])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("m", "z"), [(50, 1), (80, 4), (300, 2)])
def test_projection_is_the_cellwise_mean(weighted, m, z):
    tables = trained()
    weights = row_counts() if weighted else None
    array, report = project_tables(tables, m, z, CONSTANTS, row_weights=weights)
    assert array.dtype == torch.float32 and array.shape == (m,)
    torch.testing.assert_close(array, brute_force(tables, weights, m, z).float())
    assert report.values == 105 * DIM
    assert report.values_per_cell == pytest.approx(report.values / report.cells_hit)
    sq = weighted_sq_error(tables, weights, array, z)
    wsum = sum(float(w.sum()) for w in weights) * DIM if weighted else report.values
    assert report.weighted_rmse == pytest.approx(math.sqrt(sq / wsum), rel=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_projection_minimizes_squared_error(weighted):
    tables = trained(3)
    weights = row_counts(4) if weighted else None
    array, _ = project_tables(tables, 97, 2, CONSTANTS, row_weights=weights)
    best = weighted_sq_error(tables, weights, array, 2)
    g = torch.Generator().manual_seed(5)
    for scale in (1e-3, 1e-2, 0.1, 1.0):
        for _ in range(3):
            noisy = array + scale * torch.randn(97, generator=g)
            assert weighted_sq_error(tables, weights, noisy, 2) >= best
    for k in range(0, 97, 7):  # nudging any single cell either way never helps
        for delta in (-1e-3, 1e-3):
            nudged = array.clone()
            nudged[k] += delta
            assert weighted_sq_error(tables, weights, nudged, 2) >= best - 1e-9


def test_projection_exact_without_collisions():
    tables = trained(6)
    m, z = 1_000_000, DIM  # each row reads its own block; check the construction has no overlap
    all_cells = torch.cat([cells(i, m, z).reshape(-1) for i in range(len(SPECS))])
    assert torch.unique(all_cells).numel() == all_cells.numel()
    array, report = project_tables(tables, m, z, CONSTANTS)
    assert report.cells_hit == report.values
    assert report.values_per_cell == 1.0
    assert report.rmse == 0.0
    for i, (_, w) in enumerate(tables):
        torch.testing.assert_close(array[cells(i, m, z)], w, rtol=0, atol=0)
    assert int((array != 0).sum()) <= report.values  # untouched cells stay 0


def test_row_weights_change_the_result_as_expected():
    tables = trained(7)
    m, z = 60, 2
    plain, _ = project_tables(tables, m, z, CONSTANTS)
    ones = [torch.ones(s.num_embeddings) for s in SPECS]
    same, _ = project_tables(tables, m, z, CONSTANTS, row_weights=ones)
    torch.testing.assert_close(same, plain)
    counts = row_counts(8)
    weighted, _ = project_tables(tables, m, z, CONSTANTS, row_weights=counts)
    scaled, _ = project_tables(tables, m, z, CONSTANTS, row_weights=[5 * c for c in counts])
    torch.testing.assert_close(scaled, weighted)
    assert not torch.allclose(weighted, plain)
    # a row of weight 0 does not move the array; a heavy row pulls its cells onto its values
    zero_b = [torch.ones(60), torch.zeros(45)]
    only_a, _ = project_tables(tables, m, z, CONSTANTS, row_weights=zero_b)
    torch.testing.assert_close(only_a, project_tables(tables[:1], m, z, CONSTANTS)[0])
    heavy = [torch.ones(60), torch.ones(45)]
    heavy[0][11] = 1e9
    pulled, _ = project_tables(tables, m, z, CONSTANTS, row_weights=heavy)
    torch.testing.assert_close(pulled[cells(0, m, z)[11]], tables[0][1][11], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_equals_unchunked(weighted):
    tables = trained(9)
    weights = row_counts(10) if weighted else None
    whole, rep_whole = project_tables(tables, 70, 2, CONSTANTS, row_weights=weights)
    for chunk in (1, 7, 64):
        part, rep_part = project_tables(
            tables, 70, 2, CONSTANTS, row_weights=weights, chunk_rows=chunk
        )
        torch.testing.assert_close(part, whole, rtol=0, atol=0)
        assert rep_part.cells_hit == rep_whole.cells_hit
        assert rep_part.rmse == pytest.approx(rep_whole.rmse)


def test_project_module_reads_back_the_projection():
    tables = trained(11)
    config = RobeConfig(array_size=90, block_size=2, seed=3)
    module, report = project_module(tables, config)
    array, _ = project_tables(tables, 90, 2, robe_constants(3))
    torch.testing.assert_close(module.weight.detach(), array, rtol=0, atol=0)
    recon = torch.cat([module.materialize(s.name) - w for s, w in tables])
    assert math.sqrt(float(recon.double().pow(2).mean())) == pytest.approx(report.rmse, rel=1e-5)
    assert "cells" in str(report)


def test_projection_rejects_bad_inputs():
    tables = trained()
    with pytest.raises(ValueError, match="'b'.*shape"):
        project_tables([tables[0], (SPECS[1], torch.zeros(44, DIM))], 50, 1, CONSTANTS)
    with pytest.raises(ValueError, match="'a'.*row weights"):
        project_tables(tables, 50, 1, CONSTANTS, row_weights=[torch.ones(59), None])
    with pytest.raises(ValueError, match="'a'.*>= 0"):
        project_tables(tables, 50, 1, CONSTANTS, row_weights=[-torch.ones(60), None])
    with pytest.raises(RecipeError, match=r"\[a, b\].*smaller than the block size"):
        project_tables(tables, 3, 4, CONSTANTS)
