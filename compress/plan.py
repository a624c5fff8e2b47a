"""A recipe resolved against a model: what each table and the MLPs become, and the bytes it costs.

Rule precedence
---------------
Each embedding table is decided by the **first** ``[[tables]]`` rule, in file order, that applies
to it. A rule applies when one of its ``match`` patterns selects the table's name (a glob such as
``t_cat_*`` via :func:`fnmatch.fnmatchcase`, case-sensitive; or ``re:<regex>`` via
:func:`re.fullmatch`) **and** the table's row count lies within the rule's bounds
(``min_rows <= rows <= max_rows``, both inclusive, either optional). Later rules never override an
earlier decision, so put specific rules before general ones. A table that no rule applies to is
kept exactly as it is (``method="keep"``, ``rule_index=None``).

Every pattern of every rule must select at least one table name of the model, otherwise the recipe
is rejected (a typo would otherwise silently keep tables in FP32). A rule whose patterns match but
whose row bounds, or earlier rules, leave it no table is allowed (built-in recipes use size classes
that a given model may not have); :attr:`Plan.unused_rules` lists such rules, and
:attr:`Plan.warnings` says why for each one that would have changed its tables (any method but
``keep``). A recipe that changes nothing at all in the model (every table and the MLP kept as they
are, e.g. ``robe_100x`` on a model whose tables are all under its ``min_rows``) is rejected: it
would report a 1.0x "compression" after fine-tuning for nothing.

Bytes
-----
* ``keep``: the table's stored bytes (:attr:`~compress.io.model_spec.TableSpec.bytes`); ``fp16``:
  ``rows*dim*2``.
* ``ptq``/``qat`` with ``granularity="row"``: FBGEMM fused rows,
  :func:`~compress.quant.math.rowwise_bytes` (``rows*(dim*bits/8 + 4)``); with ``"table"``:
  :func:`~compress.quant.math.tablewise_bytes` (packed codes plus one 4-byte scale).
* ``share``: the tables of one group (a rule's ``group`` name, else the rule alone) share one flat
  array of :func:`~compress.methods.robe_hash.array_size_for` cells at 4 (fp32), 2 (fp16) or 1 (int8, plus
  one 4-byte scale) bytes a cell; the array's bytes are split over its tables in proportion to
  ``rows*dim`` (the first table takes the rounding remainder), so the sums stay exact.
* MLP: every ``nn.Linear`` of the dense arch, the projection branches and the over arch, sized from
  the spec. Kept: weights and biases at the dense dtype. ``ptq``/``qat``: per-output-channel INT-b
  weights cost ``ceil(numel*b/8)`` plus one fp32 scale per output channel; biases stay fp32. The
  DCN crossnet kernels are not ``nn.Linear`` and stay as they are.

Example::

    >>> plan = make_plan(load_recipe("int4_qat"), spec)       # spec: a DLRMSpec
    >>> plan.tables[0].bytes_after == tablewise_bytes(spec.tables[0].num_embeddings, 16, 4)
    True
    >>> print(format_plan(plan))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from compress.errors import RecipeError
from compress.io.model_spec import DLRMSpec, TableSpec, dtype_size
from compress.io.summary import format_bytes
from compress.methods.robe_hash import array_size_for
from compress.quant.math import can_pack, channel_weight_bytes, rowwise_bytes, tablewise_bytes
from compress.recipe.parse import DEFAULT_PROJECTION, Recipe, TableRule, pattern_matches

ARRAY_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
INT8_ARRAY_SCALE_BYTES = 4
FP32_BYTES = 4


@dataclass(frozen=True)
class TablePlan:
    """What one table becomes. ``rule_index`` is the deciding rule's position in the recipe
    (``None``: no rule applied, the table is kept); ``rule_text`` describes it. ``bits``,
    ``granularity``, ``scale_refresh`` and ``share_group`` are ``None`` where they do not apply."""

    name: str
    rows: int
    dim: int
    rule_index: int | None
    rule_text: str
    method: str
    bits: int | None
    granularity: str | None
    scale_refresh: int | None
    bytes_before: int
    bytes_after: int
    share_group: str | None = None


@dataclass(frozen=True)
class ShareGroupPlan:
    """One shared ROBE-Z array: its tables (in model order), total rows, cells and bytes."""

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


@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` of the model: state-dict name (without the key prefix) and sizes."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class MLPPlan:
    """What the MLP weights become (all ``nn.Linear`` layers together)."""

    method: str
    bits: int | None
    per_channel: bool
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True)
class Plan:
    """A recipe resolved against a model. Totals are embedding + dense; ``ratio`` is
    ``bytes_before / bytes_after``. ``unused_rules``: rules that decided no table. ``warnings``:
    one line for each such rule whose method would have changed a table, saying why."""

    recipe_name: str
    tables: tuple[TablePlan, ...]
    mlp: MLPPlan
    embedding_bytes_before: int
    embedding_bytes_after: int
    dense_bytes_before: int
    dense_bytes_after: int
    bytes_before: int
    bytes_after: int
    ratio: float
    needs_finetune: bool
    unused_rules: tuple[int, ...] = ()
    share_groups: tuple[ShareGroupPlan, ...] = ()
    recipe: Recipe | None = field(default=None, compare=False, repr=False)
    warnings: tuple[str, ...] = ()

    def table(self, name: str) -> TablePlan:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_json(self) -> dict:
        """A JSON-ready dictionary (the ``plan`` command's ``--json`` output)."""
        return {
            "recipe": self.recipe_name,
            "tables": [
                {
                    "name": t.name,
                    "rule": t.rule_index,
                    "rule_text": t.rule_text,
                    "method": t.method,
                    "bits": t.bits,
                    "granularity": t.granularity,
                    "scale_refresh": t.scale_refresh,
                    "share_group": t.share_group,
                    "rows": t.rows,
                    "dim": t.dim,
                    "bytes_before": t.bytes_before,
                    "bytes_after": t.bytes_after,
                }
                for t in self.tables
            ],
            "mlp": {
                "method": self.mlp.method,
                "bits": self.mlp.bits,
                "per_channel": self.mlp.per_channel,
                "bytes_before": self.mlp.bytes_before,
                "bytes_after": self.mlp.bytes_after,
            },
            "share_groups": [
                {
                    "name": g.name,
                    "rule": g.rule_index,
                    "tables": list(g.tables),
                    "rows_total": g.rows_total,
                    "dim": g.dim,
                    "cells": g.cells,
                    "block_size": g.block_size,
                    "array_dtype": g.array_dtype,
                    "projection": g.projection,
                    "bytes": g.bytes,
                }
                for g in self.share_groups
            ],
            "unused_rules": list(self.unused_rules),
            "warnings": list(self.warnings),
            "needs_finetune": self.needs_finetune,
            "embedding_bytes_before": self.embedding_bytes_before,
            "embedding_bytes_after": self.embedding_bytes_after,
            "dense_bytes_before": self.dense_bytes_before,
            "dense_bytes_after": self.dense_bytes_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": self.ratio,
        }


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


def make_plan(recipe: Recipe, spec: DLRMSpec) -> Plan:
    """Resolve ``recipe`` against the model ``spec``; :class:`RecipeError` when it does not fit."""
    check_patterns(recipe, spec)
    deciding = [decide(recipe.rules, t) for t in spec.tables]
    groups = _share_groups(recipe, spec, deciding)
    tables = tuple(
        _plan_table(recipe, t, i, groups) for t, i in zip(spec.tables, deciding, strict=True)
    )
    mlp = plan_mlp(recipe, spec)
    other_dense = crossnet_bytes(spec)
    emb_before = sum(t.bytes_before for t in tables)
    emb_after = sum(t.bytes_after for t in tables)
    dense_before = mlp.bytes_before + other_dense
    dense_after = mlp.bytes_after + other_dense
    before, after = emb_before + dense_before, emb_after + dense_after
    unused = tuple(i for i in range(len(recipe.rules)) if i not in deciding)
    warnings = tuple(unused_rule_warning(recipe, spec, deciding, i) for i in unused)
    warnings = tuple(w for w in warnings if w is not None)
    if mlp.method == "keep" and all(t.method == "keep" for t in tables):
        why = f": {warnings[0]}" if warnings else ""
        raise RecipeError(
            f"{recipe.source}: the recipe changes nothing in this model (every table and the MLP "
            f"would be kept as they are){why}"
        )
    return Plan(
        recipe_name=recipe.name,
        tables=tables,
        mlp=mlp,
        embedding_bytes_before=emb_before,
        embedding_bytes_after=emb_after,
        dense_bytes_before=dense_before,
        dense_bytes_after=dense_after,
        bytes_before=before,
        bytes_after=after,
        ratio=before / after,
        needs_finetune=recipe.needs_finetune,
        unused_rules=unused,
        share_groups=tuple(g for g, _ in groups.values()),
        recipe=recipe,
        warnings=warnings,
    )


MAX_LISTED_TABLES = 6


def unused_rule_warning(
    recipe: Recipe, spec: DLRMSpec, deciding: Sequence[int | None], index: int
) -> str | None:
    """Why rule ``index``, which decides no table, changes nothing (``None`` for a ``keep`` rule,
    which would not have changed its tables anyway)."""
    rule = recipe.rules[index]
    if rule.method == "keep":
        return None
    matched = [t for t in spec.tables if rule.matches_name(t.name)]
    in_bounds = [t for t in matched if rule.fits_rows(t.num_embeddings)]
    if not in_bounds:
        listed = ", ".join(
            f"{t.name} ({t.num_embeddings:,} rows)" for t in matched[:MAX_LISTED_TABLES]
        )
        more = (
            f" and {len(matched) - MAX_LISTED_TABLES} more"
            if len(matched) > MAX_LISTED_TABLES
            else ""
        )
        why = f"its row bounds leave out every table it matches: {listed}{more}"
    else:
        taken = sorted({deciding[spec.tables.index(t)] for t in in_bounds})
        why = (
            "earlier rules decide the tables it matches ("
            + ", ".join(f"tables[{j}]" for j in taken)
            + ")"
        )
    return f"{recipe.source}: tables[{index}] ({rule.describe()}) changes no table: {why}"


def decide(rules: Sequence[TableRule], table: TableSpec) -> int | None:
    """Index of the first rule that applies to ``table`` (name pattern and row bounds), or
    ``None`` when none does."""
    for i, rule in enumerate(rules):
        if rule.matches(table.name, table.num_embeddings):
            return i
    return None


def check_patterns(recipe: Recipe, spec: DLRMSpec) -> None:
    """:class:`RecipeError` when a rule's pattern selects no table name of the model."""
    names = [t.name for t in spec.tables]
    for i, rule in enumerate(recipe.rules):
        for pattern in rule.match:
            if not any(pattern_matches(pattern, n) for n in names):
                raise RecipeError(
                    f"{recipe.source}: tables[{i}]: pattern {pattern!r} matches no table of the "
                    f"model (tables: {', '.join(names)})"
                )


def _plan_table(
    recipe: Recipe,
    table: TableSpec,
    index: int | None,
    groups: dict[str, tuple[ShareGroupPlan, dict[str, int]]],
) -> TablePlan:
    rows, dim = table.num_embeddings, table.embedding_dim
    common = {"name": table.name, "rows": rows, "dim": dim, "bytes_before": table.bytes}
    if index is None:
        return TablePlan(
            **common,
            rule_index=None,
            rule_text="(no rule: kept)",
            method="keep",
            bits=None,
            granularity=None,
            scale_refresh=None,
            bytes_after=table.bytes,
        )
    rule = recipe.rules[index]
    group = _group_name(rule, index) if rule.method == "share" else None
    return TablePlan(
        **common,
        rule_index=index,
        rule_text=rule.describe(),
        method=rule.method,
        bits=rule.bits,
        granularity=rule.granularity,
        scale_refresh=rule.scale_refresh,
        bytes_after=groups[group][1][table.name] if group else _table_bytes(recipe, table, index),
        share_group=group,
    )


def _table_bytes(recipe: Recipe, table: TableSpec, index: int) -> int:
    """Bytes of ``table`` after rule ``index`` (any method but ``share``)."""
    rule = recipe.rules[index]
    rows, dim = table.num_embeddings, table.embedding_dim
    if rule.method == "keep":
        return table.bytes
    if rule.method == "fp16":
        return rows * dim * 2
    if not can_pack(dim, rule.bits, rule.granularity):
        raise RecipeError(
            f"{recipe.source}: tables[{index}]: {rule.granularity}-wise INT{rule.bits} cannot "
            f"store table {table.name!r} of dim {dim} (FBGEMM rows need dim*bits/8 to be a "
            "whole, even number of bytes): choose other bits or granularity 'table'"
        )
    size = rowwise_bytes if rule.granularity == "row" else tablewise_bytes
    return size(rows, dim, rule.bits)


def _group_name(rule: TableRule, index: int) -> str:
    return rule.group if rule.group is not None else f"share{index}"


def _share_groups(
    recipe: Recipe, spec: DLRMSpec, deciding: list[int | None]
) -> dict[str, tuple[ShareGroupPlan, dict[str, int]]]:
    """Each share group's array and the bytes attributed to each of its tables."""
    members: dict[str, list[tuple[TableSpec, int]]] = {}
    for table, index in zip(spec.tables, deciding, strict=True):
        if index is not None and recipe.rules[index].method == "share":
            members.setdefault(_group_name(recipe.rules[index], index), []).append((table, index))
    out: dict[str, tuple[ShareGroupPlan, dict[str, int]]] = {}
    for name, tables in members.items():
        first_index = tables[0][1]
        rule = recipe.rules[first_index]
        dims = {t.embedding_dim for t, _ in tables}
        if len(dims) != 1:
            raise RecipeError(
                f"{recipe.source}: tables[{first_index}]: share group {name!r} mixes embedding "
                f"dims {sorted(dims)}"
            )
        dim = dims.pop()
        rows_total = sum(t.num_embeddings for t, _ in tables)
        cell_bytes = ARRAY_DTYPE_BYTES[rule.array_dtype]
        try:
            cells = array_size_for(
                rows_total,
                dim,
                compression=rule.compression,
                nbytes=rule.bytes,
                dtype_bytes=cell_bytes,
                block_size=rule.block_size,
            )
        except ValueError as e:
            raise RecipeError(
                f"{recipe.source}: tables[{first_index}]: share group {name!r} "
                f"({len(tables)} tables, {rows_total} rows x {dim}): {e}"
            ) from e
        extra = INT8_ARRAY_SCALE_BYTES if rule.array_dtype == "int8" else 0
        total = cells * cell_bytes + extra
        group = ShareGroupPlan(
            name=name,
            rule_index=first_index,
            tables=tuple(t.name for t, _ in tables),
            rows_total=rows_total,
            dim=dim,
            cells=cells,
            block_size=rule.block_size,
            array_dtype=rule.array_dtype,
            bytes=total,
            projection=rule.projection or DEFAULT_PROJECTION,
        )
        out[name] = (group, split_bytes(total, [(t.name, t.num_embeddings) for t, _ in tables]))
    return out


def split_bytes(total: int, weights: Sequence[tuple[str, int]]) -> dict[str, int]:
    """``total`` bytes split over names in proportion to their weights (floor shares, the first
    name takes the remainder), summing exactly to ``total``."""
    whole = sum(w for _, w in weights)
    shares = {name: total * w // whole for name, w in weights}
    shares[weights[0][0]] += total - sum(shares.values())
    return shares


# --------------------------------------------------------------------------------------------------
# Dense part
# --------------------------------------------------------------------------------------------------


def linear_layers(spec: DLRMSpec) -> tuple[LinearLayer, ...]:
    """Every ``nn.Linear`` of the model, in state-dict order, with sizes derived from the spec.

    Over-arch input width: ``D + F*(F+1)/2`` (dot interaction, F sparse features), ``(F+1)*D``
    (DCN), ``D + (b1/D)*(b2/D)`` (projection; b1, b2 the branch output widths).
    """
    d, f = spec.embedding_dim, spec.num_sparse_features
    layers = list(
        _chain(
            "dense_arch.model._mlp.{}._linear", spec.dense_in_features, spec.dense_arch_layer_sizes
        )
    )
    if spec.model_class == "DLRM":
        over_in = d + f * (f + 1) // 2
    elif spec.model_class == "DLRM_DCN":
        over_in = (f + 1) * d
    elif spec.model_class == "DLRM_Projection":
        b1 = spec.interaction_branch1_layer_sizes or ()
        b2 = spec.interaction_branch2_layer_sizes or ()
        for branch, sizes in ((1, b1), (2, b2)):
            template = f"inter_arch.interaction_branch{branch}.model._mlp.{{}}._linear"
            layers += _chain(template, (f + 1) * d, sizes)
        over_in = d + (b1[-1] // d) * (b2[-1] // d)
    else:
        raise ValueError(f"unknown model class {spec.model_class!r}")
    over = spec.over_arch_layer_sizes
    layers += _chain("over_arch.model.0._mlp.{}._linear", over_in, over[:-1])
    last_in = over[-2] if len(over) > 1 else over_in
    layers.append(LinearLayer("over_arch.model.1", last_in, over[-1]))
    return tuple(layers)


def _chain(template: str, in_features: int, sizes: Sequence[int]) -> list[LinearLayer]:
    out, width = [], in_features
    for i, size in enumerate(sizes):
        out.append(LinearLayer(template.format(i), width, size))
        width = size
    return out


def crossnet_bytes(spec: DLRMSpec) -> int:
    """Bytes of the DCN crossnet (``W_kernels``, ``V_kernels``, ``bias`` per layer), 0 for other
    models. These are not ``nn.Linear`` layers and stay as they are."""
    if spec.model_class != "DLRM_DCN":
        return 0
    width = (spec.num_sparse_features + 1) * spec.embedding_dim
    per_layer = 2 * width * (spec.dcn_low_rank_dim or 0) + width
    return (spec.dcn_num_layers or 0) * per_layer * dtype_size(spec.dense_dtype)


def plan_mlp(recipe: Recipe, spec: DLRMSpec) -> MLPPlan:
    """Bytes of every ``nn.Linear`` before and after the recipe's ``[mlp]`` method."""
    settings = recipe.mlp
    elem = dtype_size(spec.dense_dtype)
    layers = linear_layers(spec)
    before = sum((layer.in_features + 1) * layer.out_features * elem for layer in layers)
    if settings.method == "keep":
        return MLPPlan("keep", None, settings.per_channel, before, before)
    bits = settings.bits
    after = 0
    for layer in layers:
        if not can_pack(layer.in_features, bits, "channel"):
            raise RecipeError(
                f"{recipe.source}: mlp: INT{bits} per-channel cannot store {layer.name} "
                f"({layer.out_features} x {layer.in_features})"
            )
        after += channel_weight_bytes(layer.out_features, layer.in_features, bits)
        after += FP32_BYTES * layer.out_features  # the bias stays fp32
    return MLPPlan(settings.method, bits, settings.per_channel, before, after)


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def format_plan(plan: Plan) -> str:
    """The plan as a human-readable table for the CLI: one line per table, the MLP, then totals."""
    header = ("table", "rule", "method", "bits", "granularity", "rows", "dim", "before", "after")
    rows = [
        (
            t.name,
            "-" if t.rule_index is None else str(t.rule_index),
            t.method,
            "-" if t.bits is None else str(t.bits),
            t.granularity or (t.share_group or "-"),
            f"{t.rows:,}",
            str(t.dim),
            format_bytes(t.bytes_before),
            format_bytes(t.bytes_after),
        )
        for t in plan.tables
    ]
    m = plan.mlp
    rows.append(
        (
            "(mlp)",
            "-",
            m.method,
            "-" if m.bits is None else str(m.bits),
            "channel" if m.bits is not None else "-",
            "",
            "",
            format_bytes(m.bytes_before),
            format_bytes(m.bytes_after),
        )
    )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    right = {1, 3, 5, 6, 7, 8}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [f"recipe: {plan.recipe_name}", "", line(header), *(line(r) for r in rows), ""]
    rules = {t.rule_index: t.rule_text for t in plan.tables if t.rule_index is not None}
    for i in sorted(rules):
        out.append(f"rule {i}: {rules[i]}")
    if plan.unused_rules:
        out.append("rules that decide no table: " + ", ".join(map(str, plan.unused_rules)))
    out += [f"warning: {w}" for w in plan.warnings]
    for g in plan.share_groups:
        out.append(
            f"shared array {g.name}: {len(g.tables)} tables, {g.cells:,} {g.array_dtype} "
            f"cells (Z={g.block_size}), {format_bytes(g.bytes)}"
        )
    out += [
        "",
        _total_line("embedding", plan.embedding_bytes_before, plan.embedding_bytes_after),
        _total_line("dense", plan.dense_bytes_before, plan.dense_bytes_after),
        _total_line("total", plan.bytes_before, plan.bytes_after),
        f"ratio: {plan.ratio:.2f}x   fine-tuning: {'yes' if plan.needs_finetune else 'no'}",
    ]
    return "\n".join(out)


def _total_line(label: str, before: int, after: int) -> str:
    return (
        f"{label + ':':<11}{format_bytes(before):>12} -> {format_bytes(after):>12}   "
        f"({before:,} -> {after:,} bytes)"
    )
