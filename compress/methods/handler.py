"""What a table method is: its config and its handler (no torch: reading a manifest needs this).

A **method** (:mod:`compress.methods.registry`) is a frozen config dataclass
(:class:`MethodConfig`: what a recipe rule gives it) and one handler object (:class:`TableMethod`)
with a hook for every stage, from the recipe to the serving runtimes. The PyTorch modules it makes
(:class:`~compress.methods.base.PreparedTable`, :class:`~compress.methods.base.ConvertedTable`)
are in :mod:`compress.methods.base`, which also re-exports everything here: a method's module
imports from there. Nothing here imports torch at import time, so the registry, the manifest
reader and ONNX Runtime serving run without it; the hooks that build or read tensors import it
when called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress.io.model_spec import DLRMSpec, TableSpec
    from compress.methods.base import ConvertedTable, PreparedTable
    from compress.recipe.reader import Keys
    from compress.recipe.schema import Recipe
    from exporters.artifacts.read import TableArrays
    from exporters.onnx.lookup import RowsRequest

#: Role prefix under which a table of a sharing group sees its group's arrays
#: (``shared.data``, ``shared.scale``) beside its own.
SHARED_ROLE = "shared."

#: ``(numpy dtype name, shape)`` a stored array must have; ``None`` dtype: any float.
ArraySpec = tuple[str | None, tuple[int, ...]]


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's settings: a frozen dataclass per method whose fields are what a
    recipe rule gives it. ``METHOD`` is the registered name of the method it configures."""

    METHOD: ClassVar[str]


class MethodFields(NamedTuple):
    """What the plan (``plan --json``) and the manifest report for a table: the recipe's
    ``method`` spelling and, where they apply, ``bits``, ``granularity`` and ``scale_refresh``."""

    method: str
    bits: int | None = None
    granularity: str | None = None
    scale_refresh: int | None = None


# --------------------------------------------------------------------------------------------------
# The handler


class TableMethod:
    """Everything about one way of storing a table (see the module docstring).

    A subclass sets the class attributes and implements the hooks of its stages; the defaults
    cover what most methods share. Hooks that read a stored table take a
    :class:`~exporters.artifacts.read.TableArrays` (``name``, ``num_embeddings``,
    ``embedding_dim``, ``bits``, ``arrays`` by role, the manifest ``entry``).
    """

    #: Registered name, and the manifest ``layout`` of the method's tables.
    name: ClassVar[str]
    config_type: ClassVar[type[MethodConfig]]
    #: The :class:`~compress.methods.base.ConvertedTable` subclass holding a converted table
    #: (per-table methods). A built-in method resolves it on first use (a property importing its
    #: torch module) and states its :meth:`stored_roles` without it.
    converted_type: ClassVar[type[ConvertedTable]]
    #: Whether a table under this method differs from the checkpoint's (``False``: kept as is).
    changes_tables: ClassVar[bool] = True
    #: Whether several tables read one shared array (planned, prepared and written per group).
    shares_arrays: ClassVar[bool] = False
    #: Code widths of a method storing packed integer codes (``bits`` in its manifest entries);
    #: empty for float tables.
    packed_bits: ClassVar[tuple[int, ...]] = ()
    #: Whether the stored rows are FBGEMM's row-wise format as they are (what TorchRec's quantized
    #: ``EmbeddingBagCollection`` serves without conversion).
    fbgemm_native: ClassVar[bool] = False
    #: Whether :meth:`convert` of a prepared table whose ``weight`` is any block of consecutive
    #: rows gives exactly those rows of the arrays that have a row per table row, and the whole
    #: table's other arrays (a table-wise scale): conversion may then run chunk by chunk
    #: (:mod:`compress.methods.staged_convert`); otherwise a table is converted whole.
    converts_rows_independently: ClassVar[bool] = False

    # -- recipe ------------------------------------------------------------------------------------

    def recipe_keys(self, spelling: str) -> tuple[str, ...]:
        """Rule keys (besides ``match``, ``min_rows``, ``max_rows``, ``method``) a rule spelled
        ``spelling`` may give this method."""
        return ()

    def parse(self, spelling: str, keys: Keys) -> MethodConfig:
        """The config of a rule spelled ``spelling`` (its keys already known to apply)."""
        return self.config_type()

    def recipe_items(self, config: MethodConfig) -> list[tuple[str, Any]]:
        """``(key, value)`` of ``method`` and every setting of ``config``, in file order, that
        :meth:`parse` reads back into an equal config."""
        return [("method", self.fields(config).method)]

    def describe(self, config: MethodConfig) -> str:
        """The method and its settings in a few words (``qat INT4 table P=200``)."""
        return self.fields(config).method

    def trains(self, config: MethodConfig) -> bool:
        """Whether a rule with ``config`` needs fine-tuning."""
        return False

    def check_rules(self, rules: list[tuple[int, Any]], source: str) -> None:
        """Checks across the rules ``(index, TableRule)`` of one recipe that use this method."""

    def fields(self, config: MethodConfig) -> MethodFields:
        return MethodFields(self.name)

    # -- plan ---------------------------------------------------------------------------------------

    def table_bytes(self, config: MethodConfig, table: TableSpec) -> int:
        """Stored bytes of ``table`` under ``config``; ``ValueError`` (the reason) when the
        method cannot store it."""
        raise NotImplementedError

    def group_name(self, config: MethodConfig, rule_index: int) -> str | None:
        """The sharing group of a table a rule decides (``None``: the table is stored alone)."""
        return None

    def plan_group(
        self, recipe: Recipe, name: str, members: list[tuple[TableSpec, int]]
    ) -> tuple[Any, dict[str, int]]:
        """A sharing group's plan (with ``name``, ``tables``, ``method``, ``bytes``, ``to_json()``
        and ``describe()``) and the bytes attributed to each member table."""
        raise NotImplementedError

    # -- prepare / convert -------------------------------------------------------------------------

    def stored_config(self, config: MethodConfig, table: TableSpec) -> MethodConfig:
        """The config ``table`` is prepared and stored with when a rule gives it ``config``
        (usually ``config``; a method may hand a table to another one: ``keep`` leaves an fp16
        table at fp16)."""
        return config

    def prepare(self, config: MethodConfig, weight: torch.Tensor) -> PreparedTable:
        """The fine-tunable table for FP32 ``weight`` (taken over, not copied)."""
        raise NotImplementedError

    def convert(self, prepared: PreparedTable, name: str) -> ConvertedTable:
        """The stored form of a prepared table, with the quantizers its lookup used."""
        raise NotImplementedError

    def prepare_group(
        self,
        group: Any,
        spec: DLRMSpec,
        ebc: nn.Module,
        row_counts: dict[str, torch.Tensor] | None,
    ) -> Any:
        """A sharing group as prepared: ``name``, ``method``, ``tables``, ``module`` (an EBC-like
        part) and ``notes`` for the report."""
        raise NotImplementedError

    # -- artifacts ---------------------------------------------------------------------------------

    def stored_roles(self) -> tuple[str, ...]:
        """The roles of a converted table's arrays, in order: :attr:`converted_type`'s
        ``ROLES``."""
        return self.converted_type.ROLES

    def file_roles(self) -> frozenset[str]:
        """The roles of the files a table of this method stores (``tables[i].files``): its
        converted arrays, none for a method whose tables read a shared array."""
        return frozenset() if self.shares_arrays else frozenset(self.stored_roles())

    def stored_arrays(self, rows: int, dim: int, bits: int | None) -> dict[str, ArraySpec]:
        """``{role: (dtype, shape)}`` of the files a table of ``rows x dim`` stores."""
        raise NotImplementedError

    def config_from_entry(self, entry: Mapping[str, Any]) -> MethodConfig:
        """The config of a stored table from its manifest entry."""
        return self.config_type()

    def converted_from_arrays(self, table: TableArrays) -> ConvertedTable:
        """A stored table as a :class:`ConvertedTable` (arrays copied out of the memory map)."""
        import numpy as np
        import torch

        arrays = {r: torch.from_numpy(np.array(table.arrays[r])) for r in self.stored_roles()}
        config = self.config_from_entry(table.entry)
        return self.converted_type(
            table.name, table.num_embeddings, table.embedding_dim, config, arrays
        )

    # -- ONNX ----------------------------------------------------------------------------------------

    def graph_table(self, table: TableArrays) -> Any:
        """The graph table (a numpy dataclass with ``METHOD``, ``num_rows`` and
        ``validate(dim, what)``) of a stored table; ``KeyError`` for a missing array."""
        raise NotImplementedError

    def onnx_rows(self, request: RowsRequest) -> str:
        """Append the nodes that read ``request.table``'s float32 rows ``[N, D]`` at
        ``request.ids`` (int64 ``[N]``, already inside the table) and return their name."""
        raise NotImplementedError

    def stacked_bits(self, table: Any, rowwise_impl: str) -> int | None:
        """Bit width under which the graph table joins the grouped FBGEMM-row lookup of all
        tables of that width (:mod:`exporters.onnx.stacked_rows`; the table then has
        ``packed``, ``scale`` and ``bias`` as FBGEMM stores them), or ``None``."""
        return None

    # -- TorchRec -------------------------------------------------------------------------------------

    def fbgemm_data_type(self, table: TableArrays) -> Any:
        """The ``torchrec`` ``DataType`` whose FBGEMM rows hold ``table`` exactly, or ``None``."""
        return None

    def fbgemm_rows(
        self, table: TableArrays, start: int, stop: int, row_alignment: int
    ) -> torch.Tensor:
        """Rows ``start:stop`` in FBGEMM's inference layout (uint8)."""
        raise NotImplementedError

    def fbgemm_row_bytes(self, table: TableArrays, row_alignment: int) -> int:
        raise NotImplementedError

    def fbgemm_refusal(self, table: TableArrays) -> str:
        """Why FBGEMM's rows cannot hold ``table`` exactly (it is then served by its
        :class:`ConvertedTable`)."""
        return f"layout {self.name!r} has no FBGEMM row format"

    # -- sharing methods (``shares_arrays``): a group's array and its tables -------------------------

    #: The ``dtype`` values a stored group (manifest ``shared_arrays`` entry) may have.
    group_dtypes: ClassVar[tuple[str, ...]] = ()

    def write_group(self, group: Any, save: Callable[[str, torch.Tensor], str]) -> dict:
        """The manifest's ``shared_arrays`` entry of a prepared group, its arrays saved with
        ``save(relative path, tensor) -> relative path``."""
        raise NotImplementedError

    def group_entry_fields(self, group: Any, table: str) -> dict:
        """What the manifest entry of a group's table adds (``group`` and ``table_offset``)."""
        raise NotImplementedError

    def group_arrays(
        self, dtype: str, cells: int, entry: Mapping[str, Any] | None = None
    ) -> dict[str, ArraySpec]:
        """``{role: (dtype, shape)}`` of a stored group's files (``entry``: its manifest entry,
        for files that depend on more than ``dtype`` and ``cells``, once
        :meth:`group_entry_problem` found nothing wrong with it)."""
        raise NotImplementedError

    def group_entry_problem(self, entry: Mapping[str, Any]) -> tuple[str, str] | None:
        """``(key, message)`` when a stored group's entry holds a malformed method-specific
        field, else ``None``."""
        return None

    def group_hash_problem(
        self, name: str, seed: int, constants: tuple[int, ...], prime: int
    ) -> tuple[str, str] | None:
        """``(key, message)`` when a stored group's hash parameters are not usable, else ``None``."""
        return None

    def group_tables(self, part: nn.Module) -> dict[str, tuple[dict, dict]]:
        """``{table: (arrays by role, manifest-like entry)}`` of a converted model's group module,
        for :meth:`graph_table`."""
        raise NotImplementedError

    def group_module(self, arts: Any, group: Any) -> nn.Module:
        """The EBC-like module serving a stored group (manifest ``shared_arrays`` entry)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<table method {self.name!r}>"
