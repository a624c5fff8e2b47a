"""Hot rows beside a ROBE-Z array: bytes, the split of a group's budget, and its search (no torch).

A sharing group may keep its most frequent rows ("hot rows", counted in ``--data``) exact in a
small table of their own and hash only the other rows (the tail) into the shared array; recipe
key ``hot_rows = N | "auto"`` of a ``share`` rule, ``hot_dtype = "int8" | "fp16"``. The group's
byte budget ``B`` (what ``compression``/``bytes`` give the array alone) is split between them:

- a hot row costs ``row bytes + id bytes``: INT8 row-wise as FBGEMM stores it (``D`` uint8 codes
  and an fp16 scale and bias: ``D + 4``) or fp16 (``2 D``), plus its global row id (int32, int64
  beyond ``2**31`` rows in the group) in the sorted id array the lookup searches;
- the array takes the rest: ``(B - extra - N * hot bytes) // cell bytes`` cells (``extra``: the
  int8 array's 4-byte scale), at least ``Z``.

:func:`split_budget` gives that split; :class:`HotShareOption` is the small API a size budget
solver uses ("a shared array with ``N`` hot rows at ratio ``R``": its bytes and its recipe rule).
``"auto"`` picks ``N`` that minimizes the frequency-weighted reconstruction error of the trained
table, ``sum_r count_r * ||w_r - w'_r||^2`` (hot rows: their quantization error; tail rows: the
error of the least-squares array of the smaller budget), post hoc from the row counts (CAFE,
Zhang et al., SIGMOD 2024, separates hot rows with a sketch while training; here the split is
chosen once, from the trained table). :func:`choose_hot_rows` runs that search over the ``N``
whose split fills the budget exactly (:func:`exact_hot_rows`), evaluating an error function
(:mod:`compress.methods.robe.hot_tables` computes it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from compress.methods.robe.array import INT8_SCALE_BYTES, PRECISION_BYTES

#: Stored precisions of hot rows: INT8 row-wise (FBGEMM's codes + fp16 scale and bias) or fp16.
HOT_DTYPES = ("int8", "fp16")
DEFAULT_HOT_DTYPE = HOT_DTYPES[0]
#: ``hot_rows = "auto"``: the split of least frequency-weighted error.
AUTO = "auto"
#: Groups of up to this many rows store int32 hot ids (global rows are below it).
INT32_ID_ROWS = 2**31
#: Up to this many candidate splits are all evaluated; beyond, a coarse grid then refinement.
EXHAUSTIVE_CANDIDATES = 64
#: Most evaluations of the error function in one search beyond :data:`EXHAUSTIVE_CANDIDATES`.
MAX_EVALUATIONS = 48

HotRows = int | Literal["auto"]


def hot_row_bytes(dim: int, hot_dtype: str) -> int:
    """Stored bytes of one hot row's values: INT8 ``dim + 4`` (codes, fp16 scale and bias), fp16
    ``2 * dim``."""
    if hot_dtype == "int8":
        return dim + 4
    if hot_dtype == "fp16":
        return 2 * dim
    raise ValueError(f"hot_dtype must be one of {HOT_DTYPES}, got {hot_dtype!r}")


def hot_id_dtype(rows_total: int) -> str:
    """numpy dtype of a group's hot ids (global rows ``< rows_total``)."""
    return "int32" if rows_total <= INT32_ID_ROWS else "int64"


def hot_bytes_each(dim: int, hot_dtype: str, rows_total: int) -> int:
    """Bytes one hot row takes: its values and its id."""
    return hot_row_bytes(dim, hot_dtype) + (4 if hot_id_dtype(rows_total) == "int32" else 8)


def array_extra_bytes(array_dtype: str) -> int:
    """Bytes an array stores besides its cells (int8: one float32 scale)."""
    return INT8_SCALE_BYTES if array_dtype == "int8" else 0


@dataclass(frozen=True)
class HotSplit:
    """A group's bytes split between ``hot_rows`` hot rows and an array of ``cells`` cells."""

    hot_rows: int
    cells: int
    hot_bytes: int
    array_bytes: int

    @property
    def bytes(self) -> int:
        """Everything the group stores."""
        return self.hot_bytes + self.array_bytes


def budget_bytes(cells: int, array_dtype: str) -> int:
    """The byte budget of a group whose array alone has ``cells`` cells (no hot rows)."""
    return cells * PRECISION_BYTES[array_dtype] + array_extra_bytes(array_dtype)


def max_hot_rows(
    budget: int, rows_total: int, dim: int, array_dtype: str, hot_dtype: str, block_size: int
) -> int:
    """Most hot rows that leave the array at least ``block_size`` cells (and no more than the
    group's rows)."""
    each = hot_bytes_each(dim, hot_dtype, rows_total)
    room = budget - array_extra_bytes(array_dtype) - block_size * PRECISION_BYTES[array_dtype]
    return max(0, min(rows_total, room // each))


def split_budget(
    budget: int,
    hot_rows: int,
    rows_total: int,
    dim: int,
    array_dtype: str,
    hot_dtype: str,
    block_size: int,
) -> HotSplit:
    """The array that ``budget`` bytes leave beside ``hot_rows`` hot rows; ``ValueError`` (the
    reason, with the most that fit) when they leave fewer than ``block_size`` cells."""
    if hot_rows < 0:
        raise ValueError(f"hot_rows must be >= 0, got {hot_rows}")
    if hot_rows > rows_total:
        raise ValueError(f"{hot_rows} hot rows, but the group has {rows_total} rows")
    each = hot_bytes_each(dim, hot_dtype, rows_total)
    cell = PRECISION_BYTES[array_dtype]
    hot = hot_rows * each
    cells = (budget - array_extra_bytes(array_dtype) - hot) // cell
    if cells < block_size:
        most = max_hot_rows(budget, rows_total, dim, array_dtype, hot_dtype, block_size)
        raise ValueError(
            f"{hot_rows} hot rows take {hot:,} B ({each} B a row) of the group's {budget:,} B, "
            f"leaving the array fewer than Z={block_size} cells; at most {most:,} fit"
        )
    return HotSplit(hot_rows, cells, hot, budget_bytes(cells, array_dtype))


def exact_hot_rows(
    budget: int, rows_total: int, dim: int, array_dtype: str, hot_dtype: str, upper: int
) -> range:
    """The hot-row counts ``0..upper`` whose split fills ``budget`` to the byte (``budget`` of a
    whole array): the multiples of ``cell / gcd(hot bytes, cell)``."""
    each = hot_bytes_each(dim, hot_dtype, rows_total)
    cell = PRECISION_BYTES[array_dtype]
    if (budget - array_extra_bytes(array_dtype)) % cell:
        raise ValueError(f"a budget of {budget} B is not a whole {array_dtype} array")
    return range(0, upper + 1, cell // math.gcd(each, cell))


def choose_hot_rows(
    error: Callable[[int], float],
    candidates: Sequence[int],
    exhaustive: int = EXHAUSTIVE_CANDIDATES,
    max_evaluations: int = MAX_EVALUATIONS,
) -> tuple[int, dict[int, float]]:
    """The candidate of least ``error`` (ties: the fewest hot rows) and every error evaluated.

    Up to ``exhaustive`` candidates are all evaluated (the minimum is exact). More are searched:
    the first and last and a geometric grid between (ratio 2), then repeatedly the midpoints on
    both sides of the best so far, until its neighbours are adjacent candidates or
    ``max_evaluations`` errors were computed.
    """
    if not candidates:
        raise ValueError("no candidate hot-row count")
    seen: dict[int, float] = {}

    def at(i: int) -> float:
        n = candidates[i]
        if n not in seen:
            seen[n] = float(error(n))
        return seen[n]

    last = len(candidates) - 1
    if len(candidates) <= exhaustive:
        positions = list(range(len(candidates)))
    else:
        positions = sorted({0, last, *_geometric(last)})
    for i in positions:
        at(i)
    evaluated = sorted(set(positions))
    while len(candidates) > exhaustive and len(seen) < max_evaluations:
        best = min(evaluated, key=lambda i: (at(i), i))
        k = evaluated.index(best)
        new = []
        if k > 0 and best - evaluated[k - 1] > 1:
            new.append((evaluated[k - 1] + best) // 2)
        if k < len(evaluated) - 1 and evaluated[k + 1] - best > 1:
            new.append((best + evaluated[k + 1]) // 2)
        if not new:
            break
        for i in new[: max_evaluations - len(seen)]:
            at(i)
            evaluated.append(i)
        evaluated.sort()
    best = min(evaluated, key=lambda i: (at(i), i))
    return candidates[best], dict(sorted(seen.items()))


def _geometric(last: int) -> list[int]:
    """Positions ``last / 2^k`` down to 1."""
    out, x = [], last
    while x >= 1:
        out.append(x)
        x //= 2
    return out


@dataclass(frozen=True)
class HotShareOption:
    """One way to store a table (or a group) for a size budget: a ROBE-Z array at
    ``compression`` with ``hot_rows`` hot rows (an int or ``"auto"``) at ``hot_dtype``.

    :meth:`bytes` is what it stores (exact: ``"auto"`` always fills the array's budget to the
    byte), :meth:`rule` the recipe rule keys that build it (``method = "share"`` and its keys; add
    ``match``).

    Example::

        >>> HotShareOption(1000.0, "auto").bytes(rows=1_000_000, dim=16)
        64000
        >>> HotShareOption(100.0, 500).rule()["hot_rows"]
        500
    """

    compression: float
    hot_rows: HotRows = AUTO
    hot_dtype: str = DEFAULT_HOT_DTYPE
    block_size: int = 8
    array_dtype: str = "fp32"

    def budget(self, rows: int, dim: int) -> int:
        """The bytes of the array alone at :attr:`compression`."""
        from compress.methods.robe.hashing import array_size_for

        cells = array_size_for(
            rows,
            dim,
            compression=self.compression,
            dtype_bytes=PRECISION_BYTES[self.array_dtype],
            block_size=self.block_size,
        )
        return budget_bytes(cells, self.array_dtype)

    def split(self, rows: int, dim: int) -> HotSplit | None:
        """The split of a fixed :attr:`hot_rows` (``None`` for ``"auto"``, chosen from data)."""
        if self.hot_rows == AUTO:
            return None
        return split_budget(
            self.budget(rows, dim),
            int(self.hot_rows),
            rows,
            dim,
            self.array_dtype,
            self.hot_dtype,
            self.block_size,
        )

    def bytes(self, rows: int, dim: int) -> int:
        """Stored bytes for ``rows`` rows of ``dim`` (``ValueError`` when it cannot be built)."""
        split = self.split(rows, dim)
        return self.budget(rows, dim) if split is None else split.bytes

    def rule(self) -> dict[str, Any]:
        """The ``[[tables]]`` keys (all but ``match``) that give this option."""
        return {
            "method": "share",
            "compression": float(self.compression),
            "block_size": self.block_size,
            "array_dtype": self.array_dtype,
            "hot_rows": self.hot_rows,
            "hot_dtype": self.hot_dtype,
        }
