"""ROBE-Z universal hash: where each virtual embedding element lives in a shared flat array.

PSS / ROBE-Z (Desai et al., arXiv 2207.10731, after ROBE, arXiv 2108.02191) stores all selected
tables in one flat float array ``M`` of ``|M|`` cells. Element ``(table t, row i, dim d)`` reads
exactly one cell::

    key = ((i + O_t) * R3 + floor(d / Z) * R2 + R1) mod P
    idx = key mod (|M| - Z + 1) + (d mod Z)

``O_t`` is the number of rows of the tables before ``t`` (in the order they were given), ``Z`` the
block size (a row reads contiguous runs of ``Z`` cells), ``P = 2038074743`` and ``R1, R2, R3`` are
drawn with ``numpy.random.RandomState(seed).randint(0, P)`` three times, as the public
implementation does (seed 1024 gives 634329019, 1825252241, 871205356). There is no sign hash.

int64 safety. Every ``R`` is below ``P < 2**31``. For a global row ``g = i + O_t <= 2**32 - 1``::

    g * R3 <= (2**32 - 1) * (P - 1) < 2**63

and the whole literal sum ``g*R3 + floor(d/Z)*R2 + R1 <= (P - 1) * (g + n_blocks)`` stays below
``2**63`` as long as ``g + n_blocks < 2**63 / (P - 1) ~ 4.53e9``, i.e. for any ``g < 2**32`` and
fewer than ``2**27`` blocks. We enforce ``total_rows <= MAX_TOTAL_ROWS = 2**32`` (so
``g < 2**32``) and ``dim <= MAX_DIM = 2**20``; :func:`robe_indices` additionally reduces
``g * R3`` modulo ``P`` before adding the per-block term, so its largest intermediate value is
``g * R3 < 2**63`` and every later sum is below ``2 * P``. The result equals the literal formula
evaluated with unbounded integers (tested against pure Python).

Pure functions: imports only ``math``, ``numpy`` and ``torch`` (torch in the functions that take
tensors, so that the hash constants and sizes are read without it: the manifest reader does).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch

ROBE_PRIME = 2038074743
"""``P`` of the hash (a prime below ``2**31``)."""

DEFAULT_SEED = 1024
"""Seed of the public ROBE-Z implementation."""

MAX_TOTAL_ROWS = 2**32
"""Most rows (summed over the tables sharing one array) for which int64 arithmetic is exact."""

MAX_DIM = 2**20
"""Largest embedding dimension accepted (keeps the literal formula below ``2**63``)."""


class RobeConstants(NamedTuple):
    """The three hash multipliers ``(R1, R2, R3)``, each in ``[0, P)``."""

    r1: int
    r2: int
    r3: int


def robe_constants(seed: int = DEFAULT_SEED) -> RobeConstants:
    """Draw ``(R1, R2, R3)`` exactly as the public ROBE-Z code does.

    Example::

        >>> robe_constants(1024)
        RobeConstants(r1=634329019, r2=1825252241, r3=871205356)
    """
    rng = np.random.RandomState(seed)
    return RobeConstants(*(int(rng.randint(0, ROBE_PRIME)) for _ in range(3)))


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_block_size(block_size: object) -> int:
    """Return ``block_size`` as an int; ``ValueError`` unless it is a positive integer."""
    return _check_positive_int(block_size, "block size Z")


def check_total_rows(total_rows: int) -> int:
    """``ValueError`` when ``total_rows`` rows cannot share one array with exact int64 hashing."""
    total_rows = _check_positive_int(total_rows, "total rows")
    if total_rows > MAX_TOTAL_ROWS:
        raise ValueError(
            f"{total_rows} rows share one array; the int64 hash is exact only up to "
            f"{MAX_TOTAL_ROWS} (2**32) rows: split the tables into several groups"
        )
    return total_rows


def check_dim(dim: object) -> int:
    """Return ``dim`` as an int; ``ValueError`` unless ``1 <= dim <= MAX_DIM``."""
    dim = _check_positive_int(dim, "embedding dim")
    if dim > MAX_DIM:
        raise ValueError(f"embedding dim {dim} exceeds the supported {MAX_DIM}")
    return dim


def check_array(array_size: object, block_size: object) -> tuple[int, int]:
    """Validate an array of ``array_size`` cells read in blocks of ``block_size``.

    ``ValueError`` when Z is not a positive integer, when the array has fewer cells than Z, or when
    it is so large that cells past ``P + Z - 1`` could never be read.
    """
    z = check_block_size(block_size)
    m = _check_positive_int(array_size, "array size")
    if m < z:
        raise ValueError(f"array of {m} cells is smaller than the block size Z={z}")
    if m - z + 1 > ROBE_PRIME:
        raise ValueError(
            f"array of {m} cells is larger than the hash can address (at most {ROBE_PRIME + z - 1} "
            f"cells with Z={z})"
        )
    return m, z


def array_size_for(
    total_rows: int,
    dim: int,
    compression: float | None = None,
    nbytes: int | None = None,
    dtype_bytes: int = 4,
    block_size: int = 1,
) -> int:
    """Number of cells of a shared array for a compression ratio or a byte budget.

    Exactly one of ``compression`` (``total_rows * dim / compression`` cells, rounded down) and
    ``nbytes`` (``nbytes // dtype_bytes`` cells) is given. ``ValueError`` when the result has fewer
    cells than ``block_size`` or any argument is out of range.

    Example::

        >>> array_size_for(1_000_000, 16, compression=1000)
        16000
    """
    check_total_rows(total_rows)
    dim = check_dim(dim)
    z = check_block_size(block_size)
    dtype_bytes = _check_positive_int(dtype_bytes, "dtype bytes")
    if (compression is None) == (nbytes is None):
        raise ValueError("give exactly one of compression and nbytes")
    if compression is not None:
        if not (isinstance(compression, (int, float)) and math.isfinite(compression)) or (
            compression <= 0
        ):
            raise ValueError(f"compression must be a positive number, got {compression!r}")
        cells = math.floor(total_rows * dim / compression)
        what = f"compression {compression}x of {total_rows} x {dim} values"
    else:
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 1:
            raise ValueError(f"nbytes must be a positive integer, got {nbytes!r}")
        cells = int(nbytes) // dtype_bytes
        what = f"{nbytes} bytes at {dtype_bytes} bytes a cell"
    if cells < z:
        raise ValueError(f"{what} leaves {cells} cells, fewer than the block size Z={z}")
    check_array(cells, z)
    return cells


def block_terms(dim: int, block_size: int, constants: tuple[int, int, int]) -> list[int]:
    """``(floor(d/Z) * R2 + R1) mod P`` for each of the ``ceil(dim / Z)`` blocks of a row."""
    r1, r2, _ = constants
    return [(b * r2 + r1) % ROBE_PRIME for b in range(-(-dim // block_size))]


def robe_block_starts(
    ids: torch.Tensor,
    table_offset: int | torch.Tensor,
    dim: int,
    block_size: int,
    array_size: int,
    constants: tuple[int, int, int],
    validate: bool = True,
) -> torch.Tensor:
    """First cell of each block of rows ``ids``: ``key mod (|M| - Z + 1)`` per block.

    Block ``b`` of a row covers dims ``b*Z .. b*Z + Z - 1`` and reads cells ``start .. start + Z -
    1`` (:func:`block_cells`). Arguments as :func:`robe_indices`.

    Returns:
        int64 ``[N, ceil(D / Z)]``, each in ``[0, |M| - Z]``.
    """
    import torch

    if validate:
        dim = check_dim(dim)
        array_size, block_size = check_array(array_size, block_size)
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError(f"ids must be a 1-D int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel():
            rows = ids + table_offset
            lo, hi = int(rows.min()), int(rows.max())
            if lo < 0 or hi >= MAX_TOTAL_ROWS:
                raise ValueError(
                    f"global row ids must lie in [0, 2**32), got [{lo}, {hi}] (ids + table offset)"
                )
    r3 = constants[2]
    # g * R3 < 2**63 for g < 2**32 (module docstring); reduce it first so later sums stay < 2P.
    row_key = torch.remainder((ids + table_offset) * r3, ROBE_PRIME)  # [N]
    blocks = torch.tensor(block_terms(dim, block_size, constants), dtype=torch.int64)
    key = row_key.unsqueeze(1) + blocks  # [N, n_blocks], each < 2P
    key = torch.where(key >= ROBE_PRIME, key - ROBE_PRIME, key)  # == mod P
    return torch.remainder(key, array_size - block_size + 1)


def block_cells(starts: torch.Tensor, dim: int, block_size: int) -> torch.Tensor:
    """int64 ``[N, D]`` cells from block starts ``[N, ceil(D / Z)]``: ``start + (d mod Z)``."""
    import torch

    n, n_blocks = starts.shape
    within = torch.arange(block_size, dtype=torch.int64)
    idx = (starts.unsqueeze(2) + within).reshape(n, n_blocks * block_size)
    return idx[:, :dim].contiguous() if n_blocks * block_size != dim else idx


def robe_indices(
    ids: torch.Tensor,
    table_offset: int | torch.Tensor,
    dim: int,
    block_size: int,
    array_size: int,
    constants: tuple[int, int, int],
    validate: bool = True,
) -> torch.Tensor:
    """Cells read by rows ``ids`` of a table whose first row is global row ``table_offset``.

    Args:
        ids: int64 ``[N]`` row ids within the table (``>= 0``).
        table_offset: ``O_t``, an int or an int64 tensor ``[N]`` (one offset per id, so that ids of
            several tables sharing the array are hashed in one call).
        dim: embedding dimension ``D``.
        block_size: ``Z``.
        array_size: ``|M|``.
        constants: ``(R1, R2, R3)`` from :func:`robe_constants`.
        validate: check the scalar arguments and that ``0 <= ids + table_offset < 2**32``
            (one pass over ``ids``); callers that checked already pass ``False``.

    Returns:
        int64 ``[N, D]``: ``out[n, d]`` is the cell of element ``(ids[n] + O, d)``.

    Example::

        >>> robe_indices(torch.tensor([0, 5]), 0, 4, 2, 100, robe_constants()).shape
        torch.Size([2, 4])
    """
    starts = robe_block_starts(
        ids, table_offset, dim, block_size, array_size, constants, validate=validate
    )
    return block_cells(starts, dim, block_size)
