"""Method ``robe`` (recipe ``method = "share"``): tables of a group read one hashed array (ROBE-Z).

Recipe keys: ``compression`` (ratio > 1) or ``bytes`` (the array's size), ``block_size`` (Z),
``group`` (rules naming one group share one array; their share keys must agree), ``array_dtype``
(``fp32``/``fp16``/``int8``) and ``projection`` (``frequency``: least squares weighted by how
often each row occurs in the training data; ``mean``: unweighted), ``hot_rows`` (``N`` or
``"auto"``: the group's most frequent rows in ``--data`` kept exact in a table of their own, the
others hashed; :mod:`compress.methods.robe.hot_rows`) and ``hot_dtype`` (``int8``/``fp16``).

Plan: the tables of one group (a rule's ``group`` name, else ``share<rule index>``) share one flat
array of :func:`~compress.methods.robe.hashing.array_size_for` cells at 4 (fp32), 2 (fp16) or 1
(int8, plus one 4-byte scale) bytes a cell; the array's bytes are split over its tables in
proportion to ``rows*dim`` (the first table takes the rounding remainder), so the sums stay exact.
With hot rows the same budget holds the hot rows and an array of the cells left
(:func:`~compress.methods.robe.hot_rows.split_budget`; ``"auto"`` chooses a split that fills it
to the byte).

Prepare: one :class:`~compress.methods.robe.module.RobeEmbeddingBagCollection` per group, its
array the least-squares projection of the trained tables (:mod:`compress.methods.robe.projection`).
Stored: ``shared/<group>.npy`` (and ``.scale.npy`` at int8) with the hash parameters in the
manifest's ``shared_arrays``; the group's tables store no file of their own (layout ``robe``, their
group and row offset ``O_t``). Hot rows: ``shared/<group>.hot_ids.npy`` (sorted global rows) and
``.hot.npy`` (INT8 codes, with ``.hot.scale.npy``/``.hot.bias.npy``, or fp16), described by the
entry's ``hot`` object. ONNX: int64 hash of (row, dim), then ``Gather`` from the array (hot rows:
found by a dense remap or a binary search, :mod:`compress.methods.robe.hot_graph`). TorchRec: the
same module, with the manifest's hash parameters and hot rows. The PyTorch side (the module, the
projection) is imported when a group is prepared or served by TorchRec: reading a manifest needs
no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from compress.errors import ArtifactError, RecipeError
from compress.io.summary import format_bytes
from compress.methods.handler import (
    SHARED_ROLE,
    ArraySpec,
    MethodConfig,
    MethodFields,
    TableMethod,
)
from compress.methods.registry import register
from compress.methods.robe.array import (
    ARRAY_PRECISIONS,
    INT8_SCALE_BYTES,
    PRECISION_BYTES,
    PRECISION_DTYPES,
    dequantize_stored,
)
from compress.methods.robe.config import METHOD, RobeConfig, table_offsets
from compress.methods.robe.graph import RobeTable, onnx_rows
from compress.methods.robe.hashing import (
    DEFAULT_SEED,
    ROBE_PRIME,
    array_size_for,
    robe_constants,
)
from compress.methods.robe.hot_graph import HotRowsTable
from compress.methods.robe.hot_rows import (
    AUTO,
    DEFAULT_HOT_DTYPE,
    HOT_DTYPES,
    budget_bytes,
    hot_id_dtype,
    split_budget,
)
from compress.recipe.reader import INTEGER, NUMBER, STRING, fail, is_integer, show

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress.io.model_spec import DLRMSpec, TableSpec
    from compress.methods.robe.hot_prepare import HotChoice, HotSettings
    from compress.methods.robe.module import RobeEmbeddingBagCollection
    from compress.methods.robe.projection import ProjectionReport
    from compress.recipe.reader import Keys
    from compress.recipe.schema import Recipe
    from exporters.artifacts.read import TableArrays
    from exporters.onnx.lookup import RowsRequest

SPELLING = "share"
DEFAULT_ARRAY_DTYPE = ARRAY_PRECISIONS[0]
PROJECTIONS = ("frequency", "mean")
#: How a shared array is initialised when the recipe does not say.
DEFAULT_PROJECTION = PROJECTIONS[0]
#: The settings every rule of one group must agree on (one group is one array).
GROUP_KEYS = (
    "compression",
    "bytes",
    "block_size",
    "array_dtype",
    "projection",
    "hot_rows",
    "hot_dtype",
)
#: Shared arrays up to 4 MB (fp32) take dense gradients.
DENSE_GRAD_MAX_CELLS = 1 << 20


@dataclass(frozen=True)
class ShareConfig(MethodConfig):
    """Exactly one of ``compression``/``bytes``, the block size ``Z``, an optional ``group``
    name, the array's stored precision and how it is initialised; optionally ``hot_rows`` (an
    int or ``"auto"``) kept at ``hot_dtype`` beside the array."""

    block_size: int
    compression: float | None = None
    bytes: int | None = None
    group: str | None = None
    array_dtype: str = DEFAULT_ARRAY_DTYPE
    projection: str = DEFAULT_PROJECTION
    hot_rows: int | str | None = None
    hot_dtype: str | None = None
    METHOD: ClassVar[str] = METHOD


@dataclass(frozen=True)
class ShareGroupPlan:
    """One shared ROBE-Z array: its tables (in model order), total rows, cells and bytes.

    With hot rows (``hot_rows`` an int or ``"auto"``, at ``hot_dtype``) the group's ``budget``
    (the bytes of the array alone) holds them and the array: ``cells`` and ``bytes`` are the
    split's for a fixed count, and for ``"auto"`` the array's without hot rows (the most cells it
    can have) and the budget (the chosen split fills it to the byte)."""

    name: str
    rule_index: int
    tables: tuple[str, ...]
    rows_total: int
    dim: int
    cells: int
    block_size: int
    array_dtype: str
    bytes: int
    projection: str = DEFAULT_PROJECTION
    hot_rows: int | str | None = None
    hot_dtype: str | None = None
    budget: int | None = None
    method: ClassVar[str] = METHOD

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "rule": self.rule_index,
            "tables": list(self.tables),
            "rows_total": self.rows_total,
            "dim": self.dim,
            "cells": self.cells,
            "block_size": self.block_size,
            "array_dtype": self.array_dtype,
            "projection": self.projection,
            "bytes": self.bytes,
        }
        if self.hot_rows is not None:
            out.update(hot_rows=self.hot_rows, hot_dtype=self.hot_dtype, budget=self.budget)
        return out

    def describe(self) -> str:
        cells = "up to " if self.hot_rows == AUTO else ""
        hot = ""
        if self.hot_rows == AUTO:
            hot = f", hot rows {self.hot_dtype} (how many: chosen from --data)"
        elif self.hot_rows is not None:
            hot = f", {self.hot_rows:,} hot rows {self.hot_dtype}"
        return (
            f"shared array {self.name}: {len(self.tables)} tables, {cells}{self.cells:,} "
            f"{self.array_dtype} cells (Z={self.block_size}){hot}, {format_bytes(self.bytes)}"
        )

    def hot_settings(self) -> HotSettings:
        """What :func:`~compress.methods.robe.hot_prepare.prepare_hot_group` needs."""
        from compress.methods.robe.hot_prepare import HotSettings

        return HotSettings(
            self.hot_rows,
            self.hot_dtype,
            self.budget,
            self.array_dtype,
            self.block_size,
            self.projection == "frequency",
        )


@dataclass
class SharedGroup:
    """A sharing group as prepared: its module, how its array was initialised, and the notes
    the report gives about it."""

    name: str
    module: RobeEmbeddingBagCollection
    report: ProjectionReport
    projection: str
    notes: list[str] = field(default_factory=list)
    hot: HotChoice | None = None
    method: ClassVar[str] = METHOD

    @property
    def tables(self) -> list[str]:
        return [t.name for t in self.module.tables]


class RobeMethod(TableMethod):
    name = METHOD
    config_type = ShareConfig
    shares_arrays = True
    group_dtypes = ARRAY_PRECISIONS

    # recipe
    def recipe_keys(self, spelling: str) -> tuple[str, ...]:
        return (
            "compression",
            "bytes",
            "block_size",
            "group",
            "array_dtype",
            "projection",
            "hot_rows",
            "hot_dtype",
        )

    def parse(self, spelling: str, keys: Keys) -> MethodConfig:
        has_ratio, has_bytes = keys.has("compression"), keys.has("bytes")
        if has_ratio == has_bytes:
            keys.fail(
                f"method {SPELLING!r} needs exactly one of 'compression' (ratio > 1) or 'bytes' "
                "(array size)"
            )
        compression = None
        if has_ratio:
            compression = keys.get("compression", NUMBER)
            if compression <= 1:
                keys.fail(f"compression must be > 1, got {show(keys.raw['compression'])}")
        group = keys.get("group", STRING)
        if group == "":
            keys.fail("group must be a non-empty name")
        nbytes = keys.get("bytes", INTEGER, minimum=1)
        block_size = keys.get("block_size", INTEGER, minimum=1, required=True)
        projection = keys.choice("projection", PROJECTIONS) or DEFAULT_PROJECTION
        hot_rows, hot_dtype = _parse_hot(keys, projection)
        return ShareConfig(
            block_size=block_size,
            compression=compression,
            bytes=nbytes,
            group=group,
            array_dtype=keys.choice("array_dtype", ARRAY_PRECISIONS) or DEFAULT_ARRAY_DTYPE,
            projection=projection,
            hot_rows=hot_rows,
            hot_dtype=hot_dtype,
        )

    def fields(self, config: ShareConfig) -> MethodFields:
        return MethodFields(SPELLING)

    def recipe_items(self, config: ShareConfig) -> list[tuple[str, Any]]:
        items = [
            ("method", SPELLING),
            ("compression", config.compression),
            ("bytes", config.bytes),
            ("block_size", config.block_size),
            ("group", config.group),
            ("array_dtype", config.array_dtype),
            ("projection", config.projection),
            ("hot_rows", config.hot_rows),
            ("hot_dtype", config.hot_dtype),
        ]
        return [(k, v) for k, v in items if v is not None]

    def describe(self, config: ShareConfig) -> str:
        c = config
        size = f"1/{c.compression:g}" if c.compression is not None else f"{c.bytes} B"
        group = f" group={c.group}" if c.group is not None else ""
        hot = f" hot={c.hot_rows} {c.hot_dtype}" if c.hot_rows is not None else ""
        return f"{SPELLING} {size} Z={c.block_size} {c.array_dtype}{hot}{group}"

    def trains(self, config: ShareConfig) -> bool:
        return True

    def check_rules(self, rules: list[tuple[int, Any]], source: str) -> None:
        """Rules naming one group agree on :data:`GROUP_KEYS`."""
        groups: dict[str, tuple[int, ShareConfig]] = {}
        for i, rule in rules:
            c = rule.config
            if c.group is None:
                continue
            if c.group not in groups:
                groups[c.group] = (i, c)
                continue
            j, first = groups[c.group]
            for key in GROUP_KEYS:
                if getattr(c, key) != getattr(first, key):
                    fail(
                        source,
                        f"tables[{i}]",
                        f"group {c.group!r} has {key} {show(getattr(first, key))} in tables[{j}] "
                        f"but {show(getattr(c, key))} here (one group is one array)",
                    )

    # plan
    def group_name(self, config: ShareConfig, rule_index: int) -> str | None:
        return config.group if config.group is not None else f"{SPELLING}{rule_index}"

    def plan_group(
        self, recipe: Recipe, name: str, members: list[tuple[TableSpec, int]]
    ) -> tuple[ShareGroupPlan, dict[str, int]]:
        from compress.plan import split_bytes

        first_index = members[0][1]
        c: ShareConfig = recipe.rules[first_index].config
        where = f"{recipe.source}: tables[{first_index}]: share group {name!r}"
        dims = {t.embedding_dim for t, _ in members}
        if len(dims) != 1:
            raise RecipeError(f"{where} mixes embedding dims {sorted(dims)}")
        dim = dims.pop()
        rows_total = sum(t.num_embeddings for t, _ in members)
        cell_bytes = PRECISION_BYTES[c.array_dtype]
        try:
            cells = array_size_for(
                rows_total,
                dim,
                compression=c.compression,
                nbytes=c.bytes,
                dtype_bytes=cell_bytes,
                block_size=c.block_size,
            )
        except ValueError as e:
            raise RecipeError(
                f"{where} ({len(members)} tables, {rows_total} rows x {dim}): {e}"
            ) from e
        extra = INT8_SCALE_BYTES if c.array_dtype == "int8" else 0
        total = cells * cell_bytes + extra
        budget = None
        if c.hot_rows is not None:
            budget = budget_bytes(cells, c.array_dtype)
            if c.hot_rows != AUTO:
                try:
                    split = split_budget(
                        budget,
                        c.hot_rows,
                        rows_total,
                        dim,
                        c.array_dtype,
                        c.hot_dtype,
                        c.block_size,
                    )
                except ValueError as e:
                    raise RecipeError(f"{where}: hot_rows: {e}") from None
                cells, total = split.cells, split.bytes
        group = ShareGroupPlan(
            name=name,
            rule_index=first_index,
            tables=tuple(t.name for t, _ in members),
            rows_total=rows_total,
            dim=dim,
            cells=cells,
            block_size=c.block_size,
            array_dtype=c.array_dtype,
            bytes=total,
            projection=c.projection,
            hot_rows=c.hot_rows,
            hot_dtype=c.hot_dtype,
            budget=budget,
        )
        return group, split_bytes(total, [(t.name, t.num_embeddings) for t, _ in members])

    # prepare
    def prepare_group(
        self,
        group: ShareGroupPlan,
        spec: DLRMSpec,
        ebc: nn.Module,
        row_counts: dict[str, torch.Tensor] | None,
    ) -> SharedGroup:
        from compress.io.table_stream import chunk_rows_setting, progress_bytes
        from compress.methods.robe.array import ArrayQuantization
        from compress.methods.robe.projection import DEFAULT_CHUNK_ROWS, project_module

        tables = [spec.table(n) for n in group.tables]
        weighted = group.projection == "frequency" and row_counts is not None
        pairs = [(t, ebc.embedding_bags[t.name].weight.detach()) for t in tables]
        weights = [row_counts[t.name].double() for t in tables] if weighted else None
        config = RobeConfig(array_size=group.cells, block_size=group.block_size, seed=DEFAULT_SEED)
        # A small array trains faster with dense gradients (the optimizer step over every cell
        # costs less than sparse bookkeeping; the updates are the same): benchmarks/bench_robe.py
        sparse = group.cells > DENSE_GRAD_MAX_CELLS
        # the --chunk-rows setting, else 262,144 rows at dim 16 (as many values at other dims)
        chunk = chunk_rows_setting() or max(1, DEFAULT_CHUNK_ROWS * 16 // tables[0].embedding_dim)
        nbytes = sum(w.numel() * w.element_size() for _, w in pairs)
        hot = None
        with progress_bytes(2 * nbytes, f"project {group.name}"):  # projection, then its error
            if group.hot_rows is None:
                module, report = project_module(
                    pairs, config, row_weights=weights, chunk_rows=chunk, sparse=sparse
                )
            else:
                from compress.methods.robe.hot_prepare import prepare_hot_group

                counts = [row_counts[t.name] for t in tables] if row_counts is not None else None
                module, report, hot = prepare_hot_group(
                    group.name, pairs, counts, group.hot_settings(), chunk, sparse
                )
                config = module.config
        if group.array_dtype != DEFAULT_ARRAY_DTYPE:
            module.set_quantization(ArrayQuantization(precision=group.array_dtype))
        projection = "frequency" if weighted else "mean"
        how = "row-frequency weighted " if weighted else ""
        notes = [
            f"shared array {group.name}: {config.array_size:,} cells initialised by the {how}"
            f"least-squares projection of {len(tables)} trained tables (reconstruction RMSE "
            f"{report.rmse:.4g})"
            if hot is None or not hot.hot_rows
            else f"shared array {group.name}: {config.array_size:,} cells initialised by the "
            f"{how}least-squares projection of the rows of {len(tables)} trained tables that "
            "are not hot"
        ]
        if hot is not None:
            notes.append(_hot_note(group, hot, row_counts is not None))
        if projection != group.projection:
            notes.append(
                f"shared array {group.name}: no training data to count row frequencies, so every "
                "row weighs the same in the projection; give --data for the frequency-weighted one"
            )
        return SharedGroup(group.name, module, report, projection, notes, hot)

    # artifacts
    def write_group(self, group: SharedGroup, save: Callable[[str, torch.Tensor], str]) -> dict:
        """The manifest's ``shared_arrays`` entry of a prepared group, its array saved with
        ``save(relative path, tensor) -> relative path``."""
        from compress.methods.robe.array import quantize_array

        module, name = group.module, group.name
        quant = module.quantization
        if quant is not None and quant.group_size is not None:
            raise ArtifactError(
                f"shared array {name}: int8 with a scale per {quant.group_size} cells cannot be "
                "exported yet (the artifact format holds one scale per array)"
            )
        precision = quant.precision if quant is not None else DEFAULT_ARRAY_DTYPE
        data, scale = quantize_array(module.weight.detach(), precision)
        files = {"data": save(f"shared/{name}.npy", data)}
        if scale is not None:
            files["scale"] = save(f"shared/{name}.scale.npy", scale)
        nbytes = data.numel() * data.element_size() + (
            scale.numel() * 4 if scale is not None else 0
        )
        hot = {}
        if module.hot_rows:
            arrays = _hot_arrays(module)
            for role, tensor in arrays.items():
                files[role] = save(f"shared/{name}.{HOT_FILES[role]}.npy", tensor)
                nbytes += tensor.numel() * tensor.element_size()
            hot = {"hot": _hot_entry(module)}
        constants = module.config.constants
        return {
            "name": name,
            "tables": [t.name for t in module.tables],
            "cells": module.config.array_size,
            "block_size": module.config.block_size,
            "seed": module.config.seed,
            "constants": [constants.r1, constants.r2, constants.r3],
            "prime": ROBE_PRIME,
            "dtype": precision,
            "projection": group.projection,
            **hot,
            "files": files,
            "bytes": nbytes,
        }

    def stored_arrays(self, rows: int, dim: int, bits: int | None) -> dict[str, ArraySpec]:
        return {}  # a group's tables store nothing of their own: they read its array

    def group_entry_fields(self, group: SharedGroup, table: str) -> dict:
        """What a group table's manifest entry adds: its group and its row offset ``O_t``."""
        offsets = dict(zip(group.tables, table_offsets(group.module.tables), strict=True))
        return {"group": group.name, "table_offset": offsets[table]}

    def group_arrays(
        self, dtype: str, cells: int, entry: Mapping[str, Any] | None = None
    ) -> dict[str, ArraySpec]:
        """The files of a stored group of ``cells`` cells at ``dtype``: the cells (and one int8
        scale), and the hot rows its ``entry`` describes (checked by
        :meth:`group_entry_problem`)."""
        out: dict[str, ArraySpec] = {"data": (PRECISION_DTYPES[dtype], (cells,))}
        if dtype == "int8":
            out["scale"] = ("float32", (1,))
        hot = (entry or {}).get("hot")
        if hot is not None:
            n, dim = hot["rows"], hot["dim"]
            out["hot_ids"] = (hot["ids_dtype"], (n,))
            if hot["dtype"] == "int8":
                out.update(
                    hot_data=("uint8", (n, dim)),
                    hot_scale=("float16", (n,)),
                    hot_bias=("float16", (n,)),
                )
            else:
                out["hot_data"] = ("float16", (n, dim))
        return out

    def group_entry_problem(self, entry: Mapping[str, Any]) -> tuple[str, str] | None:
        """``(key, message)`` when a stored group's ``hot`` object is malformed, else ``None``."""
        if "hot" not in entry:
            return None
        hot = entry["hot"]
        if not isinstance(hot, dict):
            return "hot", "expected an object"
        for key in ("rows", "dim"):
            v = hot.get(key)
            if not is_integer(v) or v < 1:
                return f"hot.{key}", f"expected a positive integer, got {show(v)}"
        if hot.get("dtype") not in HOT_DTYPES:
            return "hot.dtype", f"expected one of {list(HOT_DTYPES)}, got {show(hot.get('dtype'))}"
        if hot.get("ids_dtype") not in ("int32", "int64"):
            return "hot.ids_dtype", f"expected 'int32' or 'int64', got {show(hot.get('ids_dtype'))}"
        return None

    def group_hash_problem(
        self, name: str, seed: int, constants: tuple[int, ...], prime: int
    ) -> tuple[str, str] | None:
        """``(key, message)`` when the recorded hash is not the one ``seed`` draws with ROBE's
        prime (a lookup must never silently use other hash functions), else ``None``."""
        try:
            expected = list(robe_constants(seed))
        except ValueError as e:
            return "seed", f"shared array {name!r}: not a usable seed ({e})"
        if list(constants) != expected or prime != ROBE_PRIME:
            return "constants", (
                f"shared array {name!r}: hash constants {list(constants)} (P={prime}) do not "
                f"match seed {seed} ({expected}, P={ROBE_PRIME})"
            )
        return None

    # ONNX
    def group_tables(self, part: RobeEmbeddingBagCollection) -> dict[str, tuple[dict, dict]]:
        """``{table: (arrays by role, entry)}`` of a converted model's group module, as
        :meth:`graph_table` reads them from artifacts (the array dequantized once: the graph
        stores it once)."""
        array = part.dequantized_array().detach().cpu().contiguous().numpy()
        c = part.config
        group = {
            "name": f"shared_{part.tables[0].name}",
            "block_size": c.block_size,
            "prime": ROBE_PRIME,
            "constants": list(part.constants),
            "cells": c.array_size,
        }
        arrays = {SHARED_ROLE + "data": array}
        if part.hot_rows:
            group["hot"] = _hot_entry(part)
            arrays.update(
                {
                    SHARED_ROLE + r: a.cpu().contiguous().numpy()
                    for r, a in _hot_arrays(part).items()
                }
            )
        return {
            t.name: (arrays, {"table_offset": offset, "shared": group})
            for t, offset in zip(part.tables, table_offsets(part.tables), strict=True)
        }

    def graph_table(self, table: TableArrays) -> Any:
        """The group's array as stored (the graph dequantizes what it gathers), so that a saved
        graph reads the stored file in place."""
        group = table.entry["shared"]
        array, scale = _stored_array_and_scale(table)
        return RobeTable(
            array=array,
            scale=scale,
            num_rows=table.num_embeddings,
            block_size=int(group["block_size"]),
            table_offset=int(table.entry["table_offset"]),
            seeds=tuple(int(c) for c in group["constants"]),
            prime=int(group["prime"]),
            array_name=str(group["name"]),
            hot=_hot_graph_table(table),
        )

    def onnx_rows(self, request: RowsRequest) -> str:
        return onnx_rows(request)

    # TorchRec
    def fbgemm_refusal(self, table: TableArrays) -> str:
        return f"reads shared array {table.entry['shared']['name']!r}"

    def group_module(self, arts: Any, group: Any) -> nn.Module:
        """The module of one stored shared array: its tables in the group's order, the
        manifest's hash parameters (checked against what the seed gives), the array dequantized
        to float32."""
        import torch

        from compress.io.model_spec import TableSpec
        from compress.methods.robe.module import RobeEmbeddingBagCollection

        where = f"{arts.path}: shared array {group.name!r}"
        tables = [arts.tables[n] for n in group.tables]
        specs = [
            TableSpec(t.name, t.num_embeddings, t.embedding_dim, tuple(t.feature_names))
            for t in tables
        ]
        config = RobeConfig(array_size=group.cells, block_size=group.block_size, seed=group.seed)
        if tuple(config.constants) != tuple(group.constants) or group.prime != ROBE_PRIME:
            raise ArtifactError(
                f"{where}: hash constants {list(group.constants)} (prime {group.prime}) are not "
                f"what seed {group.seed} gives {list(config.constants)} (prime {ROBE_PRIME})"
            )
        for t, offset in zip(tables, table_offsets(specs), strict=True):
            if int(t.entry["table_offset"]) != offset:
                raise ArtifactError(
                    f"{where}: table {t.name!r} has row offset {t.entry['table_offset']}, its "
                    f"place in the group gives {offset}"
                )
        module = RobeEmbeddingBagCollection(specs, config)
        with torch.no_grad():
            array = np.array(_stored_array(tables[0]), dtype=np.float32)
            module.weight.copy_(torch.from_numpy(array))
        hot = _hot_graph_table(tables[0])
        if hot is not None:
            from compress.methods.robe.hot_tables import dequantize_hot

            values = dequantize_hot(np.array(hot.data), hot.scale, hot.bias)
            try:
                module.set_hot_rows(
                    torch.from_numpy(np.array(hot.ids, dtype=np.int64)),
                    torch.from_numpy(values),
                    str(tables[0].entry["shared"]["hot"]["dtype"]),
                    fake_quantize=False,  # the stored rows, dequantized once
                )
            except ValueError as e:
                raise ArtifactError(f"{where}: {e}") from None
        return module


#: File names (``shared/<group>.<name>.npy``) of the hot-row roles.
HOT_FILES = {
    "hot_ids": "hot_ids",
    "hot_data": "hot",
    "hot_scale": "hot.scale",
    "hot_bias": "hot.bias",
}


def _parse_hot(keys: Keys, projection: str) -> tuple[int | str | None, str | None]:
    """``(hot_rows, hot_dtype)`` of a share rule (``(None, None)`` without ``hot_rows``)."""
    if not keys.has("hot_rows"):
        keys.refuse("hot_dtype", "hot_dtype applies only with hot_rows (the hot rows' precision)")
        return None, None
    raw = keys.raw["hot_rows"]
    if raw != AUTO and not (is_integer(raw) and raw >= 0):
        keys.fail(f'hot_rows must be a non-negative integer or "auto", got {show(raw)}')
    if raw == AUTO and projection != "frequency":
        keys.fail(
            'hot_rows = "auto" chooses the split by the frequency-weighted error, which needs '
            f'projection = "frequency" (got {show(projection)}); give a number of rows instead'
        )
    return raw, keys.choice("hot_dtype", HOT_DTYPES) or DEFAULT_HOT_DTYPE


def _hot_note(group: ShareGroupPlan, hot: HotChoice, counted: bool) -> str:
    """The report's line about a group's hot rows."""
    where = f"shared array {group.name}"
    if not counted:
        return (
            f"{where}: no training data to count row frequencies, so no hot rows were kept "
            '(hot_rows = "auto"); give --data to keep the most frequent rows exact'
        )
    how = "chosen by the least frequency-weighted error" if group.hot_rows == AUTO else "fixed"
    text = (
        f"{where}: {hot.hot_rows:,} hot rows ({how}) kept {group.hot_dtype} beside "
        f"{hot.cells:,} cells; they serve {hot.coverage:.1%} of the lookups in --data"
    )
    if not np.isnan(hot.weighted_rmse):
        text += (
            f"; frequency-weighted RMSE {hot.weighted_rmse:.4g} (no hot rows: "
            f"{hot.weighted_rmse_without:.4g}; {hot.evaluated} splits evaluated)"
        )
    return text


def _hot_arrays(module: RobeEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    """The stored arrays of a module's hot rows: ids (at the group's id dtype) and values."""
    import torch

    from compress.methods.robe.hot_tables import quantize_hot

    total = sum(t.num_embeddings for t in module.tables)
    dtype = getattr(torch, hot_id_dtype(total))
    return {
        "hot_ids": module.hot_ids.detach().cpu().to(dtype),
        **quantize_hot(module.hot_weight.detach().cpu(), module.hot_dtype),
    }


def _hot_entry(module: RobeEmbeddingBagCollection) -> dict:
    """The ``hot`` object of a group's manifest entry."""
    total = sum(t.num_embeddings for t in module.tables)
    return {
        "rows": module.hot_rows,
        "dtype": module.hot_dtype,
        "dim": module.dim,
        "ids_dtype": hot_id_dtype(total),
    }


def _hot_graph_table(table: TableArrays) -> HotRowsTable | None:
    """The hot rows of a stored (or converted) group table, as the graph reads them."""
    hot = table.entry["shared"].get("hot")
    if hot is None:
        return None
    a = table.arrays
    return HotRowsTable(
        ids=a[SHARED_ROLE + "hot_ids"],
        data=a[SHARED_ROLE + "hot_data"],
        scale=a.get(SHARED_ROLE + "hot_scale"),
        bias=a.get(SHARED_ROLE + "hot_bias"),
    )


def _stored_array_and_scale(table: TableArrays) -> tuple[np.ndarray, float | None]:
    """The shared array a stored group table reads, as stored, and its scale (int8 only)."""
    data = table.arrays[SHARED_ROLE + "data"]
    if data.dtype != np.int8:
        return data, None
    scale = table.arrays.get(SHARED_ROLE + "scale")
    if scale is None or scale.size != 1:
        got = None if scale is None else scale.size
        raise ArtifactError(
            f"table {table.name!r}: shared int8 array needs exactly one scale, got {got}"
        )
    return data, float(np.asarray(scale).reshape(()))


def _stored_array(table: TableArrays) -> np.ndarray:
    """The float32 values of the shared array a stored group table reads."""
    scale = table.arrays.get(SHARED_ROLE + "scale")
    try:
        return dequantize_stored(table.arrays[SHARED_ROLE + "data"], scale)
    except ValueError as e:
        raise ArtifactError(f"table {table.name!r}: {e}") from None


register(RobeMethod())
