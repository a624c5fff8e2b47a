"""What a table method is: its config, its handler, and the modules it makes.

A **method** (:mod:`compress.methods.registry`) is a frozen config dataclass
(:class:`MethodConfig`: what a recipe rule gives it) and one handler object (:class:`TableMethod`)
with a hook for every stage, from the recipe to the serving runtimes. Its prepared tables are
:class:`PreparedTable` modules (FP32 master weights, fake-quantized gathered rows), its converted
tables :class:`ConvertedTable` modules (the stored arrays as buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

if TYPE_CHECKING:
    from compress.io.model_spec import DLRMSpec, TableSpec
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
# The modules a method returns


class PreparedTable(nn.Module):
    """One table of a prepared (fine-tunable) model: its FP32 master ``weight`` and settings.

    :meth:`lookup` gathers the rows of ``ids`` with a sparse gradient and lets
    :meth:`fake_quantize_` overwrite them in place under ``no_grad``: autograd sees only the
    gather, so the gradient reaching the table is the incoming one, unchanged (the
    straight-through estimator) and still sparse.
    """

    def __init__(self, weight: torch.Tensor, config: MethodConfig, trainable: bool) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(weight, requires_grad=trainable)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[N, D]`` of ``ids [N]`` as the converted table will return them."""
        rows = F.embedding(ids, self.weight, sparse=True)
        with torch.no_grad():
            self.fake_quantize_(rows)
        return rows

    def fake_quantize_(self, rows: torch.Tensor) -> None:
        """Round gathered ``rows`` in place to what the stored table holds."""

    def training_step(self, step: int) -> None:
        """Called before every training forward with the number of training forwards so far."""

    @property
    def refreshes_scale(self) -> bool:
        """Whether the table rescans ``max|W|`` for a table-wide scale while training; such a
        table can keep a running summary instead (:meth:`track`,
        :func:`compress.methods.qat_embedding.track_scale_updates`)."""
        return False

    def track(self) -> None:
        """From now on keep the summary up to date from the optimizer's steps (which change
        only the rows of their sparse gradients)."""

    def before_optimizer_step(self) -> None:
        """Called before each ``optimizer.step()`` of a tracked table."""

    def after_optimizer_step(self) -> None:
        """Called after each ``optimizer.step()`` of a tracked table."""


class ConvertedTable(nn.Module):
    """One converted table: its stored arrays as registered buffers, one per role in ``ROLES``
    (state-dict keys ``<table>.data``, ``<table>.scale``, ...), so ``state_dict()`` holds them
    and ``.to()`` moves them. :meth:`lookup` dequantizes only the gathered rows. The artifact
    writer stores role ``data`` as ``tables/<table>.npy`` and any other as
    ``tables/<table>.<role>.npy``."""

    ROLES: ClassVar[tuple[str, ...]] = ("data",)

    def __init__(
        self,
        name: str,
        num_embeddings: int,
        embedding_dim: int,
        config: MethodConfig,
        arrays: Mapping[str, torch.Tensor],
    ) -> None:
        super().__init__()
        if set(arrays) != set(self.ROLES):
            raise ValueError(f"table {name!r}: arrays {sorted(arrays)}, expected {self.ROLES}")
        self.name = name
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.config = config
        for role in self.ROLES:
            self.register_buffer(role, arrays[role])

    def arrays(self) -> dict[str, torch.Tensor]:
        """The stored arrays by role, in :attr:`ROLES` order (the buffers themselves)."""
        return {role: getattr(self, role) for role in self.ROLES}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        return sum(a.numel() * a.element_size() for a in self.arrays().values())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """float32 rows ``[N, D]`` of ``ids [N]``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.num_embeddings}x{self.embedding_dim}, {self.config}"


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
    #: The :class:`ConvertedTable` subclass holding a converted table (per-table methods).
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

    def file_roles(self) -> frozenset[str]:
        """The roles of the files a table of this method stores (``tables[i].files``): its
        converted arrays, none for a method whose tables read a shared array."""
        return frozenset() if self.shares_arrays else frozenset(self.converted_type.ROLES)

    def stored_arrays(self, rows: int, dim: int, bits: int | None) -> dict[str, ArraySpec]:
        """``{role: (dtype, shape)}`` of the files a table of ``rows x dim`` stores."""
        raise NotImplementedError

    def config_from_entry(self, entry: Mapping[str, Any]) -> MethodConfig:
        """The config of a stored table from its manifest entry."""
        return self.config_type()

    def converted_from_arrays(self, table: TableArrays) -> ConvertedTable:
        """A stored table as a :class:`ConvertedTable` (arrays copied out of the memory map)."""
        import numpy as np

        arrays = {r: torch.from_numpy(np.array(table.arrays[r])) for r in self.converted_type.ROLES}
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

    def group_arrays(self, dtype: str, cells: int) -> dict[str, ArraySpec]:
        """``{role: (dtype, shape)}`` of a stored group's files."""
        raise NotImplementedError

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
