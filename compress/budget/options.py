"""What a budget may choose for each table and for the MLP, and the exact bytes of each choice.

An option is a recipe rule's keys (``method = "ptq"``, ``bits = 4``, ...): the budget's choice is
written as an ordinary recipe (:func:`budget_recipe`), one rule per table, so ``--recipe`` repeats
it and the plan's byte accounting (:mod:`compress.plan`) applies unchanged. Every option's bytes
come from the method registry's own hooks, the ones ``make_plan`` calls
(:meth:`~compress.methods.handler.TableMethod.table_bytes`, or
:meth:`~compress.methods.handler.TableMethod.plan_group` for a table alone in a shared array), and
the MLP's from :func:`compress.plan.plan_mlp`: the chosen options' bytes sum to the plan's
``bytes_after``, which is what the artifacts hold.

Per table (:func:`table_options`; an option a table cannot take, such as row-wise INT2 at a dim
that is not a multiple of 8, is left out):

* ``keep`` (the checkpoint's values) and ``fp16``;
* ``ptq`` at 8, 4 and 2 bits, row-wise (FBGEMM rows; each width's default ``ranges``) and
  table-wise (one scale);
* ``share``: the table alone in a ROBE-Z array (Z = 8) of 1/16, 1/32, ... 1/8192 of its FP32
  bytes (:data:`SHARE_RATIOS`; the plan prints the ratio in cells, 4x smaller at int8), stored
  as int8 with one scale (:data:`SHARE_DTYPE`: 4x the cells of an fp32 array for the same
  bytes); and each such array once more with hot rows beside it, ``hot_rows = "auto"`` in the
  same bytes (:class:`~compress.methods.robe.hot_rows.HotShareOption`). A hot-row option
  *refines* its plain array (:attr:`Option.refines`): choosing the hot-row split means a search
  over splits, each a projection of the table, so it is measured only for the arrays a choice
  picks (:meth:`compress.budget.choose.Measured.solve`).

The MLP (:func:`mlp_options`): ``keep``, ``ptq`` INT8 and INT4 per output channel.

When the chosen plan fine-tunes (:func:`training_rule`), its ``ptq`` choices become ``qat`` at the
same width (the same bytes), the ranges unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from compress.errors import RecipeError
from compress.io.model_spec import DLRMSpec, TableSpec
from compress.methods import registry
from compress.methods.handler import MethodConfig
from compress.methods.robe.hot_rows import AUTO, HotShareOption
from compress.methods.robe.method import SPELLING as SHARE_SPELLING
from compress.plan import FP32_BYTES, crossnet_bytes, plan_mlp
from compress.recipe.reader import Keys
from compress.recipe.schema import MLPSettings, Recipe, TableRule
from compress.train.config import TrainConfig

#: Byte ratios (to the table at FP32) of the shared-array options.
SHARE_RATIOS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
#: How the shared arrays of the options are stored: int8 gives 4x the cells of fp32 for the same
#: bytes.
SHARE_DTYPE = "int8"
#: Cell bytes of :data:`SHARE_DTYPE`.
SHARE_CELL_BYTES = 1
#: ROBE-Z's block size Z (the built-in ``robe_*`` recipes' choice), or the dim when smaller.
SHARE_BLOCK = 8
PTQ_BITS = (8, 4, 2)
GRANULARITIES = ("row", "table")
MLP_BITS = (8, 4)
_GLOB_CHARS = re.compile(r"[*?\[\]]")


@dataclass(frozen=True)
class Option:
    """One choice for a table or the MLP: ``label`` (what the plan prints: the method's own
    description), ``rule`` (the recipe keys; for the MLP the ``[mlp]`` keys), the parsed
    ``config`` (tables; ``None`` for the MLP) and its exact ``nbytes``. ``refines``: the
    ``rule`` of the option this one refines (a shared array with hot rows refines the plain
    array of the same size); such an option is measured only where that one is chosen."""

    label: str
    rule: tuple[tuple[str, Any], ...]
    nbytes: int
    config: MethodConfig | None = None
    refines: tuple[tuple[str, Any], ...] | None = None

    @property
    def keys(self) -> dict[str, Any]:
        return dict(self.rule)

    @property
    def is_keep(self) -> bool:
        return self.keys["method"] == "keep"


def table_pattern(name: str) -> str:
    """A ``match`` pattern that selects exactly the table ``name`` (a glob when the name has no
    glob characters, else an escaped ``re:`` pattern)."""
    return name if not _GLOB_CHARS.search(name) else "re:" + re.escape(name)


def parse_rule_config(rule: Mapping[str, Any], where: str = "option") -> MethodConfig:
    """The method config a recipe rule with these keys (``method`` and the method's own) gives,
    read by the method's own parser (so its defaults are the recipe's)."""
    spelling = rule["method"]
    keys = Keys(dict(rule), "<budget>", where)
    return registry.for_recipe(spelling, keys).parse(spelling, keys)


def one_rule_recipe(table: TableSpec, config: MethodConfig) -> Recipe:
    """A recipe whose one rule gives ``table`` (alone) ``config``: what a sharing method plans
    and prepares a group from."""
    rule = TableRule(match=(table_pattern(table.name),), config=config)
    return Recipe("option", "", (rule,), MLPSettings(), None, "<budget>")


def option_bytes(table: TableSpec, config: MethodConfig) -> int:
    """Bytes of ``table`` under ``config`` as the plan counts them (alone in its group when the
    method shares arrays); ``ValueError`` or :class:`RecipeError` when the method cannot store
    it."""
    method = registry.for_config(config)
    group = method.group_name(config, 0)
    if group is None:
        return method.table_bytes(config, table)
    _, shares = method.plan_group(one_rule_recipe(table, config), group, [(table, 0)])
    return shares[table.name]


def candidate_rules(table: TableSpec) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """``(rule keys, keys of the option it refines)`` of every option the module docstring lists
    for ``table`` (before checking which the table can take)."""
    rules: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
        ({"method": "keep"}, None),
        ({"method": "fp16"}, None),
    ]
    for granularity in GRANULARITIES:
        for bits in PTQ_BITS:
            rules.append(({"method": "ptq", "bits": bits, "granularity": granularity}, None))
    block = min(SHARE_BLOCK, table.embedding_dim)
    for ratio in SHARE_RATIOS:
        compression = float(ratio * SHARE_CELL_BYTES / FP32_BYTES)
        share = {
            "method": SHARE_SPELLING,
            "compression": compression,
            "block_size": block,
            "array_dtype": SHARE_DTYPE,
        }
        rules.append((share, None))
        hot = HotShareOption(compression, AUTO, block_size=block, array_dtype=SHARE_DTYPE)
        rules.append((hot.rule(), share))
    return rules


def table_options(table: TableSpec) -> list[Option]:
    """The options ``table`` can take, with their exact bytes (``keep`` first)."""
    out: list[Option] = []
    seen: set[tuple] = set()
    for rule, refines in candidate_rules(table):
        try:
            config = parse_rule_config(rule)
            nbytes = option_bytes(table, config)
        except (ValueError, RecipeError):
            continue  # the table cannot take it (dim, too few rows for the array)
        key = (config, nbytes)
        if key in seen:
            continue
        seen.add(key)
        out.append(
            Option(
                registry.for_config(config).describe(config),
                tuple(rule.items()),
                int(nbytes),
                config,
                None if refines is None else tuple(refines.items()),
            )
        )
    return out


def mlp_settings(rule: Mapping[str, Any]) -> MLPSettings:
    """The ``[mlp]`` settings of an MLP option's keys."""
    if rule["method"] == "keep":
        return MLPSettings()
    return MLPSettings(method=rule["method"], bits=int(rule["bits"]), per_channel=True)


def mlp_options(spec: DLRMSpec) -> list[Option]:
    """``keep``, ``ptq`` INT8 and INT4 for every MLP linear, with their bytes
    (:func:`compress.plan.plan_mlp`; a width that cannot store a layer is left out)."""
    rules = [{"method": "keep"}] + [{"method": "ptq", "bits": b} for b in MLP_BITS]
    out = []
    for rule in rules:
        recipe = Recipe("option", "", (), mlp_settings(rule), None, "<budget>")
        try:
            nbytes = plan_mlp(recipe, spec).bytes_after
        except RecipeError:
            continue
        out.append(Option(mlp_settings(rule).describe(), tuple(rule.items()), int(nbytes)))
    return out


def fixed_bytes(spec: DLRMSpec) -> int:
    """Bytes no option changes: the DCN cross layers, written in fp32 (0 for other classes)."""
    return crossnet_bytes(spec, FP32_BYTES)


def training_rule(rule: Mapping[str, Any], config: MethodConfig | None) -> dict[str, Any]:
    """The keys of an option in a plan that fine-tunes: ``ptq`` becomes ``qat`` (the same stored
    format and bytes; row-wise ``ranges`` kept as the post-training option had them)."""
    out = dict(rule)
    if out["method"] != "ptq":
        return out
    out["method"] = "qat"
    ranges = getattr(config, "ranges", None)
    if ranges is not None:
        out["ranges"] = ranges
    return out


def budget_recipe(
    name: str,
    description: str,
    spec: DLRMSpec,
    tables: Mapping[str, Option],
    mlp: Option,
    finetune: TrainConfig | None,
) -> Recipe:
    """The recipe of a choice: one rule per table (model order, matching exactly that table) and
    ``[mlp]``. With ``finetune`` settings, ``ptq`` choices become ``qat``
    (:func:`training_rule`) and ``[finetune]`` holds the settings, when anything then trains
    (a recipe of kept and fp16 tables only fine-tunes nothing)."""
    from compress.recipe.parse import recipe_from_dict

    def keys_of(option: Option) -> dict[str, Any]:
        return training_rule(option.keys, option.config) if finetune else option.keys

    rules = [{"match": [table_pattern(t.name)], **keys_of(tables[t.name])} for t in spec.tables]
    mlp_keys = keys_of(mlp)
    data: dict[str, Any] = {"name": name, "description": description, "tables": rules}
    if mlp_keys["method"] != "keep":
        data["mlp"] = mlp_keys
    trains = mlp_keys["method"] == "qat" or any(
        registry.for_config(config).trains(config)
        for config in (
            parse_rule_config({k: v for k, v in r.items() if k != "match"}) for r in rules
        )
    )
    if finetune is not None and trains:
        data["finetune"] = {k: v for k, v in dataclasses.asdict(finetune).items() if v is not None}
    return recipe_from_dict(data, f"<{name}>")
