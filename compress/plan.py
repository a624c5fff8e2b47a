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
* A table: what its method stores (:meth:`~compress.methods.registry.TableMethod.table_bytes`).
  ``keep`` (:mod:`compress.methods.keep`): the table at its checkpoint precision: an fp32 table
  ``rows*dim*4``, an fp16 one ``rows*dim*2`` (written as fp16); a bf16 table is written as its
  exact fp32 values (no artifact layout holds bf16), ``rows*dim*4``. ``fp16``: ``rows*dim*2``.
  ``ptq``/``qat`` with ``granularity="row"``: FBGEMM fused rows,
  :func:`~compress.quant.fbgemm_rowwise.rowwise_bytes` (``rows*(dim*bits/8 + 4)``); with
  ``"table"``: :func:`~compress.quant.tablewise.tablewise_bytes` (packed codes plus one 4-byte
  scale).
* A method that shares arrays (``share``, :mod:`compress.methods.robe.method`) plans per group:
  the tables of one group (a rule's ``group`` name, else the rule alone) share one flat array,
  whose bytes are split over its tables in proportion to their rows (:func:`split_bytes`; the
  first table takes the rounding remainder), so the sums stay exact.
* MLP: every ``nn.Linear`` of the dense arch, the projection branches and the over arch, sized from
  the spec; before: at the checkpoint's dense dtype. Kept: weights and biases as written, fp32
  (the compressed model computes its dense layers in fp32). ``ptq``/``qat``: per-output-channel
  INT-b weights cost ``ceil(numel*b/8)`` plus one fp32 scale per output channel; biases stay fp32.
  The DCN crossnet kernels are not ``nn.Linear`` and are written as they are, in fp32.

Example::

    >>> plan = make_plan(load_recipe("int4_qat"), spec)       # spec: a DLRMSpec
    >>> plan.tables[0].bytes_after == tablewise_bytes(spec.tables[0].num_embeddings, 16, 4)
    True
    >>> print(format_plan(plan))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from compress.errors import RecipeError
from compress.io.dlrm_classes import strategy_for
from compress.io.dlrm_classes.base import LinearLayer
from compress.io.model_spec import DLRMSpec, TableSpec, dtype_size
from compress.io.summary import format_bytes
from compress.methods import registry
from compress.methods.handler import MethodConfig
from compress.quant.activation import ACTIVATION_QPARAM_BYTES
from compress.quant.packing import can_pack
from compress.quant.per_channel import channel_weight_bytes
from compress.recipe.schema import Recipe, TableRule, pattern_matches

FP32_BYTES = 4


@dataclass(frozen=True)
class TablePlan:
    """What one table becomes. ``rule_index`` is the deciding rule's position in the recipe
    (``None``: no rule applied, the table is kept); ``rule_text`` describes it; ``config`` is the
    method's settings (:mod:`compress.methods.registry`). ``method``, ``bits``, ``granularity``
    and ``scale_refresh`` are what the method reports (``None`` where they do not apply);
    ``share_group`` names the shared array a sharing method's table reads."""

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
    config: MethodConfig = field(default_factory=registry.default_config)


@dataclass(frozen=True)
class MLPPlan:
    """What the MLP weights become (all ``nn.Linear`` layers together)."""

    method: str
    bits: int | None
    per_channel: bool
    bytes_before: int
    bytes_after: int
    activations: str = "fp32"  # "int8": static INT8 inputs (8 more bytes a layer: scale, zero)


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
    #: the plans of the shared arrays of sharing methods (their ``to_json()`` and ``describe()``)
    share_groups: tuple[Any, ...] = ()
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
                **({"activations": "int8"} if self.mlp.activations == "int8" else {}),
            },
            "share_groups": [g.to_json() for g in self.share_groups],
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
    """Resolve ``recipe`` against the model ``spec``; :class:`RecipeError` when it does not fit
    (or is a budget recipe, which the main job resolves from data: :mod:`compress.budget`)."""
    if recipe.budget is not None:
        raise RecipeError(
            f"{recipe.source}: budget = {recipe.budget.text!r}: the tables of a budget recipe are "
            "chosen by measuring them on data; run the main job with --data to choose and "
            "compress (it saves the chosen recipe as recipe.toml in the artifacts)"
        )
    check_patterns(recipe, spec)
    deciding = [decide(recipe.rules, t) for t in spec.tables]
    groups = _share_groups(recipe, spec, deciding)
    tables = tuple(
        _plan_table(recipe, t, i, groups) for t, i in zip(spec.tables, deciding, strict=True)
    )
    mlp = plan_mlp(recipe, spec)
    emb_before = sum(t.bytes_before for t in tables)
    emb_after = sum(t.bytes_after for t in tables)
    dense_before = mlp.bytes_before + crossnet_bytes(spec)
    dense_after = mlp.bytes_after + crossnet_bytes(spec, FP32_BYTES)
    before, after = emb_before + dense_before, emb_after + dense_after
    unused = tuple(i for i in range(len(recipe.rules)) if i not in deciding)
    warnings = tuple(unused_rule_warning(recipe, spec, deciding, i) for i in unused)
    warnings = tuple(w for w in warnings if w is not None)
    if (
        mlp.method == "keep"
        and not recipe.only_finetunes  # fine-tuning the uncompressed model is its purpose
        and not any(registry.for_config(t.config).changes_tables for t in tables)
    ):
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
    if not rule.table_method.changes_tables:
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
    groups: dict[str, tuple[Any, dict[str, int]]],
) -> TablePlan:
    config = recipe.rules[index].config if index is not None else registry.default_config()
    method = registry.for_config(config)
    group = method.group_name(config, index) if index is not None else None
    if group is not None:
        bytes_after = groups[group][1][table.name]
    else:
        try:
            bytes_after = method.table_bytes(config, table)
        except ValueError as e:
            raise RecipeError(f"{recipe.source}: tables[{index}]: {e}") from None
    fields = method.fields(config)
    return TablePlan(
        name=table.name,
        rows=table.num_embeddings,
        dim=table.embedding_dim,
        rule_index=index,
        rule_text=recipe.rules[index].describe() if index is not None else "(no rule: kept)",
        method=fields.method,
        bits=fields.bits,
        granularity=fields.granularity,
        scale_refresh=fields.scale_refresh,
        bytes_before=table.bytes,
        bytes_after=bytes_after,
        share_group=group,
        config=config,
    )


def _share_groups(
    recipe: Recipe, spec: DLRMSpec, deciding: list[int | None]
) -> dict[str, tuple[Any, dict[str, int]]]:
    """Each shared array (of a sharing method, :meth:`TableMethod.plan_group`) and the bytes
    attributed to each of its tables, by group name."""
    members: dict[str, list[tuple[TableSpec, int]]] = {}
    for table, index in zip(spec.tables, deciding, strict=True):
        if index is None:
            continue
        config = recipe.rules[index].config
        name = registry.for_config(config).group_name(config, index)
        if name is not None:
            members.setdefault(name, []).append((table, index))
    return {
        name: recipe.rules[tables[0][1]].table_method.plan_group(recipe, name, tables)
        for name, tables in members.items()
    }


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
    """Every ``nn.Linear`` of the model, in state-dict order, with sizes derived from the spec by
    its class's strategy (:meth:`compress.io.dlrm_classes.base.DLRMClass.linear_groups`)."""
    groups = strategy_for(spec.model_class).linear_groups(spec)
    return tuple(layer for layers in groups.values() for layer in layers)


def crossnet_bytes(spec: DLRMSpec, elem: int | None = None) -> int:
    """Bytes of the interaction's cross layers (DCN: ``W_kernels``, ``V_kernels``, ``bias`` per
    layer; 0 for classes without) at ``elem`` bytes a value (default: the checkpoint's dense
    dtype). They are not ``nn.Linear`` layers and are written as they are, in fp32."""
    shapes = [
        shape
        for layer in strategy_for(spec.model_class).cross_layers(spec)
        for shape in layer.shapes().values()
    ]
    return sum(math.prod(shape) for shape in shapes) * (elem or dtype_size(spec.dense_dtype))


def plan_mlp(recipe: Recipe, spec: DLRMSpec) -> MLPPlan:
    """Bytes of every ``nn.Linear`` before and after the recipe's ``[mlp]`` method."""
    settings = recipe.mlp
    elem = dtype_size(spec.dense_dtype)
    layers = linear_layers(spec)
    before = sum((layer.in_features + 1) * layer.out_features * elem for layer in layers)
    if settings.method == "keep":  # written as the compressed model holds them: fp32
        after = sum((layer.in_features + 1) * layer.out_features * FP32_BYTES for layer in layers)
        return MLPPlan("keep", None, settings.per_channel, before, after)
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
        if settings.activations == "int8":  # the input's scale and zero point
            after += ACTIVATION_QPARAM_BYTES
    return MLPPlan(settings.method, bits, settings.per_channel, before, after, settings.activations)


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
            "-"
            if m.bits is None
            else ("channel, int8 act" if m.activations == "int8" else "channel"),
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
    out += [g.describe() for g in plan.share_groups]
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
