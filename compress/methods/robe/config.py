"""A ROBE-Z sharing group's settings and table layout, without torch.

:class:`RobeConfig` (array size ``|M|``, block size ``Z``, hash seed), the checks that tables can
share one array, and each table's row offset ``O_t`` in it (:func:`table_offsets`). The module
that computes lookups (:class:`~compress.methods.robe.module.RobeEmbeddingBagCollection`) takes a
config; the method's handler (:mod:`compress.methods.robe.method`) and the graph tables
(:mod:`compress.methods.robe.graph`) read these without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from compress.errors import RecipeError
from compress.io.model_spec import TableSpec
from compress.methods.robe.hashing import (
    DEFAULT_SEED,
    RobeConstants,
    array_size_for,
    check_array,
    check_dim,
    check_total_rows,
    robe_constants,
)

#: The registered name of the method whose groups this module serves
#: (:mod:`compress.methods.robe.method`).
METHOD = "robe"


@dataclass(frozen=True)
class RobeConfig:
    """Settings of one sharing group: ``array_size`` cells ``|M|``, block size ``Z``, hash seed."""

    array_size: int
    block_size: int
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise RecipeError(f"ROBE seed must be an integer in [0, 2**32), got {seed!r}")

    @property
    def constants(self) -> RobeConstants:
        return robe_constants(self.seed)

    @classmethod
    def for_tables(
        cls,
        tables: Sequence[TableSpec],
        block_size: int,
        compression: float | None = None,
        nbytes: int | None = None,
        seed: int = DEFAULT_SEED,
    ) -> RobeConfig:
        """Config whose array is ``compression`` times smaller than ``tables`` (or ``nbytes``)."""
        validate_tables(tables)
        total_rows = sum(t.num_embeddings for t in tables)
        try:
            size = array_size_for(
                total_rows,
                tables[0].embedding_dim,
                compression=compression,
                nbytes=nbytes,
                block_size=block_size,
            )
        except ValueError as e:
            raise RecipeError(f"sharing group {table_names(tables)}: {e}") from None
        return cls(array_size=size, block_size=block_size, seed=seed)


def table_names(tables: Sequence[TableSpec]) -> str:
    """``[a, b, ...]``: the tables of a group as error messages name them."""
    return "[" + ", ".join(t.name for t in tables) + "]"


def validate_tables(tables: Sequence[TableSpec]) -> None:
    """``RecipeError`` unless ``tables`` can share one array (non-empty, unique names, one dim)."""
    if not tables:
        raise RecipeError("a sharing group needs at least one table")
    seen: set[str] = set()
    for t in tables:
        if t.name in seen:
            raise RecipeError(
                f"sharing group {table_names(tables)}: table {t.name!r} appears twice"
            )
        seen.add(t.name)
        if t.num_embeddings < 1:
            raise RecipeError(f"table {t.name!r}: num_embeddings must be positive")
    dim = tables[0].embedding_dim
    for t in tables:
        if t.embedding_dim != dim:
            raise RecipeError(
                f"sharing group {table_names(tables)}: table {t.name!r} has dim {t.embedding_dim}, "
                f"{tables[0].name!r} has {dim}; tables sharing an array need one dim"
            )
    try:
        check_dim(dim)
        check_total_rows(sum(t.num_embeddings for t in tables))
    except ValueError as e:
        raise RecipeError(f"sharing group {table_names(tables)}: {e}") from None


def validate_sharing(tables: Sequence[TableSpec], array_size: int, block_size: int) -> None:
    """``RecipeError`` (one line naming the tables and parameter) for an unusable sharing group."""
    validate_tables(tables)
    try:
        check_array(array_size, block_size)
    except ValueError as e:
        raise RecipeError(f"sharing group {table_names(tables)}: {e}") from None


def table_offsets(tables: Sequence[TableSpec]) -> list[int]:
    """``O_t`` of each table: the rows of the tables before it, in the given order."""
    offsets, total = [], 0
    for t in tables:
        offsets.append(total)
        total += t.num_embeddings
    return offsets
