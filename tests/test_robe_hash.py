"""Tests for compress.methods.robe.hashing: the ROBE-Z hash against a pure-Python reading of the formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.methods.robe.hashing import (
    DEFAULT_SEED,
    MAX_DIM,
    MAX_TOTAL_ROWS,
    ROBE_PRIME,
    array_size_for,
    check_array,
    robe_constants,
    robe_indices,
)

CONSTANTS = robe_constants(DEFAULT_SEED)


def reference_index(row: int, offset: int, d: int, z: int, m: int, consts) -> int:
    """The ROBE-Z hash (arXiv 2207.10731) as :mod:`compress.methods.robe.hashing` states it, with Python's
    unbounded integers."""
    r1, r2, r3 = consts
    key = ((row + offset) * r3 + (d // z) * r2 + r1) % ROBE_PRIME
    return key % (m - z + 1) + (d % z)


def reference_rows(ids, offset, dim, z, m, consts) -> torch.Tensor:
    return torch.tensor(
        [[reference_index(int(i), offset, d, z, m, consts) for d in range(dim)] for i in ids],
        dtype=torch.int64,
    )


def test_constants_match_public_implementation():
    assert DEFAULT_SEED == 1024
    assert ROBE_PRIME == 2038074743
    assert tuple(robe_constants(1024)) == (634329019, 1825252241, 871205356)
    rng = np.random.RandomState(7)
    assert tuple(robe_constants(7)) == tuple(int(rng.randint(0, ROBE_PRIME)) for _ in range(3))


def test_int64_bound_holds_for_any_seed():
    # Any R < P. The largest row key our code forms is g * R3 with g < 2**32 ...
    g_max = MAX_TOTAL_ROWS - 1
    assert g_max * (ROBE_PRIME - 1) < 2**63
    # ... and even the literal sum of the formula stays in int64 for every block of MAX_DIM dims.
    assert (ROBE_PRIME - 1) * (g_max + MAX_DIM) < 2**63
    # Twice as many rows and the product could overflow for a large R3 (the bound is not slack).
    assert (2**33) * (ROBE_PRIME - 1) > 2**63


@pytest.mark.parametrize(
    ("dim", "z", "m"),
    [(16, 1, 1000), (16, 16, 1000), (16, 4, 97), (10, 4, 5000), (8, 32, 64), (3, 1, 3)],
)
def test_indices_match_reference(dim, z, m):
    g = torch.Generator().manual_seed(dim * 1000 + z)
    ids = torch.randint(0, 50_000, (64,), generator=g)
    got = robe_indices(ids, 123, dim, z, m, CONSTANTS)
    assert got.dtype == torch.int64 and got.shape == (64, dim)
    assert torch.equal(got, reference_rows(ids, 123, dim, z, m, CONSTANTS))
    assert int(got.min()) >= 0 and int(got.max()) < m


def test_indices_near_the_row_limit():
    offset = MAX_TOTAL_ROWS - 5000
    ids = torch.tensor([0, 1, 2500, 4998, 4999])
    for z, m in [(1, 1_000_003), (4, 123_457), (16, 2_000_000)]:
        got = robe_indices(ids, offset, 16, z, m, CONSTANTS)
        assert torch.equal(got, reference_rows(ids, offset, 16, z, m, CONSTANTS))
    with pytest.raises(ValueError, match="2\\*\\*32"):
        robe_indices(torch.tensor([5000]), offset, 16, 4, 1000, CONSTANTS)
    with pytest.raises(ValueError):
        robe_indices(torch.tensor([-1]), 0, 16, 4, 1000, CONSTANTS)


def test_blocks_are_contiguous_and_dims_share_blocks():
    ids = torch.arange(200)
    idx = robe_indices(ids, 0, 16, 16, 1000, CONSTANTS)  # Z = dim: one contiguous run a row
    assert torch.equal(idx - idx[:, :1], torch.arange(16).expand(200, 16))
    idx = robe_indices(ids, 0, 16, 1, 1000, CONSTANTS)  # Z = 1: every dim hashed on its own
    assert not torch.equal(idx[:, 1] - idx[:, 0], torch.ones(200, dtype=torch.int64))


def test_per_id_offsets_equal_per_table_calls():
    ids = torch.tensor([0, 3, 9, 3])
    offs = torch.tensor([0, 0, 100, 100])
    got = robe_indices(ids, offs, 8, 2, 777, CONSTANTS)
    assert torch.equal(got[:2], robe_indices(ids[:2], 0, 8, 2, 777, CONSTANTS))
    assert torch.equal(got[2:], robe_indices(ids[2:], 100, 8, 2, 777, CONSTANTS))


def test_different_seeds_give_different_cells():
    ids = torch.arange(100)
    a = robe_indices(ids, 0, 8, 1, 10_000, robe_constants(1024))
    b = robe_indices(ids, 0, 8, 1, 10_000, robe_constants(1025))
    assert not torch.equal(a, b)


def test_array_size_for():
    assert array_size_for(1_000_000, 16, compression=1000) == 16_000
    assert array_size_for(1_000_000, 16, compression=100, block_size=16) == 160_000
    assert array_size_for(10, 4, nbytes=4096) == 1024
    assert array_size_for(10, 4, nbytes=4096, dtype_bytes=2) == 2048


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(total_rows=100, dim=16, compression=1000, block_size=4), "fewer than the block"),
        (dict(total_rows=100, dim=16, nbytes=8, block_size=4), "fewer than the block"),
        (dict(total_rows=100, dim=16, compression=2, block_size=0), "positive integer"),
        (dict(total_rows=100, dim=16, compression=2, block_size=2.0), "positive integer"),
        (dict(total_rows=100, dim=16), "exactly one"),
        (dict(total_rows=100, dim=16, compression=2, nbytes=10), "exactly one"),
        (dict(total_rows=100, dim=16, compression=-1), "compression"),
        (dict(total_rows=MAX_TOTAL_ROWS + 1, dim=16, compression=1000), "2\\*\\*32"),
        (dict(total_rows=100, dim=0, compression=2), "dim"),
    ],
)
def test_array_size_for_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        array_size_for(**kwargs)


def test_check_array():
    assert check_array(10, 10) == (10, 10)
    with pytest.raises(ValueError, match="smaller than the block size"):
        check_array(9, 10)
    with pytest.raises(ValueError, match="larger than the hash can address"):
        check_array(ROBE_PRIME + 1, 1)
    with pytest.raises(ValueError, match="positive integer"):
        check_array(100, -2)
