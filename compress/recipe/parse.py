"""Read a recipe: TOML text or a file (or a built-in by name) -> a validated :class:`Recipe`.

A recipe is read with :mod:`tomllib` and validated strictly: an unknown key, a value of the wrong
type or range, or settings that contradict each other raise :class:`~compress.errors.RecipeError`
with one line naming the file and the ``tables[i]`` rule, the ``mlp`` or ``finetune`` table, and the
key at fault (:mod:`compress.recipe.reader`). The keys are described in
:mod:`compress.recipe.schema`; a rule's method (looked up in :mod:`compress.methods.registry`)
validates its own keys. Recipes round-trip: ``parse_recipe(recipe_to_toml(r)) == r``
(:mod:`compress.recipe.toml_out`).

Example::

    >>> r = load_recipe("int4_qat")
    >>> (r.rules[0].config.bits, r.rules[0].config.scale_refresh, r.mlp.method)
    (4, 200, 'qat')
"""

from __future__ import annotations

import math
import re
import sys
import tomllib
import types
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any

from compress.budget.spec import Budget, BudgetError, parse_budget
from compress.errors import RecipeError
from compress.io.user_files import read_user_text
from compress.methods import registry
from compress.methods.handler import TableMethod
from compress.recipe.builtin import builtin_names, builtin_path
from compress.recipe.reader import (
    BOOLEAN,
    INTEGER,
    STRING,
    Keys,
    Kind,
    fail,
    is_number,
    is_real,
    kind_of,
    show,
    show_choices,
)
from compress.recipe.schema import (
    FINETUNE_KEYS,
    MLP_ACTIVATIONS,
    MLP_BITS,
    MLP_KEYS,
    MLP_METHODS,
    REGEX_PREFIX,
    TOP_KEYS,
    MLPSettings,
    Recipe,
    TableRule,
    rule_keys,
    training_parts,
)
from compress.train.config import (
    DENSE_OPTIMIZERS,
    GRAD_BITS,
    MAX_EPOCHS,
    MAX_STEPS,
    OPTIMIZERS,
    SELECT_METRICS,
    SPARSE_OPTIMIZERS,
    TARGETS,
    TrainConfig,
)

#: A ``[finetune]`` float (a learning rate, ``epochs``): any finite number.
_FLOAT = Kind("a number", is_number, float)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (``"int4_qat"`` = ``recipes/int4_qat.toml``) or a ``.toml`` path.

    A :class:`~pathlib.Path`, or a string ending in ``.toml`` or containing a path separator, is a
    path; anything else is a built-in name.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        return _load_path(Path(name_or_path))
    names = builtin_names()
    if text not in names:
        raise RecipeError(
            f"unknown recipe {text!r}: not a built-in ({', '.join(names)}) and not a .toml path"
        )
    return _load_path(builtin_path(text))


def _load_path(path: Path) -> Recipe:
    if path.suffix != ".toml":
        raise RecipeError(f"{path}: a recipe file must be a .toml file")
    text = read_user_text(path, "recipe file", RecipeError)
    return parse_recipe(text, str(path))


def parse_recipe(text: str, source: str = "<string>") -> Recipe:
    """Parse and validate recipe TOML ``text``; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(_syntax_message(str(e), text, source)) from e
    except RecursionError as e:  # tomllib recurses once per nested array or inline table
        raise RecipeError(f"{source}: invalid TOML: nesting too deep") from e
    except ValueError as e:  # int() of a decimal integer longer than Python converts
        raise RecipeError(_long_integer_message(text, source, e)) from e
    return recipe_from_dict(data, source)


#: What a recipe ``name`` may be (it becomes part of the default output directory's name); a
#: leading ``.`` (``.``, ``..``, hidden names) is refused apart.
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
#: Deepest nesting of tables and arrays a recipe may have (``[[tables]]`` ``match`` lists are 3).
MAX_NESTING = 32
#: Integers longer than this (about 100 decimal digits) are refused before any message prints one.
MAX_INT_BITS = 332
_DIGITS_RE = re.compile(r"[0-9][0-9_]*")


def _long_integer_message(text: str, source: str, error: ValueError) -> str:
    """``file:line: key: integer of N digits is too large`` for the first run of digits in
    ``text`` longer than Python converts (the key is what stands before ``=`` on its line), else
    the error's first line."""
    limit = sys.get_int_max_str_digits() or math.inf
    for m in _DIGITS_RE.finditer(text):
        digits = len(m.group()) - m.group().count("_")
        if digits > limit:
            before = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
            key = before.split("=")[0].strip() if "=" in before else ""
            where = f"{_printable(key)}: " if key else ""
            line = text.count("\n", 0, m.start()) + 1
            return f"{source}:{line}: {where}integer of {digits:,} digits is too large"
    return f"{source}: invalid TOML: {str(error).splitlines()[0][:200]}"


def _check_size(data: Any, source: str) -> None:
    """Refuse nesting deeper than :data:`MAX_NESTING` and integers longer than
    :data:`MAX_INT_BITS`, naming the key; iterative, so any depth is safe to walk."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_NESTING:
            fail(source, path, f"nesting too deep (more than {MAX_NESTING} levels)")
        if isinstance(value, dict):
            stack += [
                (v, f"{path}.{_printable(k)}" if path else _printable(k), depth + 1)
                for k, v in value.items()
            ]
        elif isinstance(value, list):
            stack += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            fail(source, path, f"integer of {value.bit_length():,} bits is too large")


def _printable(key: object) -> str:
    text = str(key)
    return text if text.isprintable() else ascii(text)


_POSITION_RE = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")


def _syntax_message(message: str, text: str, source: str) -> str:
    """``file:line:col: invalid TOML: ...`` from a :class:`tomllib.TOMLDecodeError` message."""
    m = _POSITION_RE.match(message)
    if m:
        return f"{source}:{m['line']}:{m['col']}: invalid TOML: {m['msg']}"
    end = " (at end of document)"
    if message.endswith(end):
        last_line = text.count("\n") + (0 if text.endswith("\n") else 1)
        return f"{source}:{max(last_line, 1)}: invalid TOML: {message[: -len(end)]} at end of file"
    return f"{source}: invalid TOML: {message}"


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Validate a parsed TOML document and build the :class:`Recipe`."""
    _check_size(data, source)
    keys = Keys(data, source, "")
    keys.check_known(TOP_KEYS)
    name = keys.get("name", STRING, required=True)
    if not NAME_RE.fullmatch(name) or name.startswith("."):
        keys.fail(
            f"name must be letters, digits, '_', '.' or '-' (not starting with '.'): it names "
            f"the default output directory; got {show(name)}"
        )
    description = keys.get("description", STRING) or ""
    raw_rules = data.get("tables", [])
    if not isinstance(raw_rules, list):
        keys.fail(f"'tables' must be an array of tables ([[tables]]), got {kind_of(raw_rules)}")
    rules = tuple(_parse_rule(raw, i, source) for i, raw in enumerate(raw_rules))
    mlp = _parse_mlp(_get_table(data, "mlp", source), source) if "mlp" in data else MLPSettings()
    finetune = None
    if "finetune" in data:
        finetune = _parse_finetune(_get_table(data, "finetune", source), source)
    budget = _parse_budget(data, source) if "budget" in data else None
    recipe = Recipe(name, description, rules, mlp, finetune, source, budget)
    check_recipe(recipe)
    return recipe


def _parse_budget(data: dict[str, Any], source: str) -> Budget:
    """``budget = ...`` (:mod:`compress.budget.spec`); a budget recipe states no ``[[tables]]``
    and no ``[mlp]``: the budget chooses them."""
    try:
        budget = parse_budget(data["budget"], "budget")
    except BudgetError as e:
        raise RecipeError(f"{source}: {e}") from None
    for key, what in (("tables", "[[tables]] rules"), ("mlp", "an [mlp] table")):
        if key in data:
            fail(
                source,
                "budget",
                f"a budget chooses every table's method and the MLP's: remove {what} (or the "
                "budget)",
            )
    return budget


def check_recipe(recipe: Recipe) -> None:
    """Whole-recipe checks: fine-tuning present exactly when something trains, a sparse-capable
    optimizer when tables train, no rule after a catch-all, and each method's own checks across
    its rules (share groups that agree on the array)."""
    source = recipe.source
    if recipe.budget is not None:  # [finetune] fine-tunes whatever the budget chooses
        if recipe.finetune is not None and recipe.finetune.optimizer not in SPARSE_OPTIMIZERS:
            fail(
                source,
                "finetune",
                f"optimizer {recipe.finetune.optimizer!r} cannot take the sparse embedding "
                f"gradients of the tables a budget may choose to train (use "
                f"{show_choices(SPARSE_OPTIMIZERS)})",
            )
        return
    training = training_parts(recipe.rules, recipe.mlp)
    if training and recipe.finetune is None:
        where, method = training[0]
        fail(
            source,
            where,
            f"method {method!r} needs fine-tuning but the recipe has no [finetune] table",
        )
    if not training and recipe.finetune is not None and not recipe.only_finetunes:
        fail(
            source,
            "finetune",
            "nothing is fine-tuned (no rule uses qat or share and the MLP is not qat): "
            "remove [finetune] (only a recipe that keeps every table and the MLP may fine-tune "
            "without compressing)",
        )
    trained_tables = [where for where, _ in training if where != "mlp"]
    if recipe.only_finetunes:  # the kept tables are what trains, with sparse gradients
        trained_tables = ["every kept table"]
    if (
        recipe.finetune is not None
        and trained_tables
        and recipe.finetune.optimizer not in SPARSE_OPTIMIZERS
    ):
        fail(
            source,
            "finetune",
            f"optimizer {recipe.finetune.optimizer!r} cannot take the sparse embedding gradients "
            f"that {trained_tables[0]} trains with (use {show_choices(SPARSE_OPTIMIZERS)})",
        )
    for i, rule in enumerate(recipe.rules):
        if rule.is_catch_all and i + 1 < len(recipe.rules):
            fail(
                source,
                f"tables[{i + 1}]",
                f"can never apply: tables[{i}] matches every table ({', '.join(rule.match)} with "
                "no row bounds); put catch-all rules last",
            )
    by_method: dict[TableMethod, list[tuple[int, TableRule]]] = defaultdict(list)
    for i, rule in enumerate(recipe.rules):
        by_method[rule.table_method].append((i, rule))
    for method, rules in by_method.items():
        method.check_rules(rules, source)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def _parse_rule(raw: Any, index: int, source: str) -> TableRule:
    where = f"tables[{index}]"
    if not isinstance(raw, dict):
        fail(source, where, f"must be a table, got {kind_of(raw)}")
    keys = Keys(raw, source, where)
    keys.check_known(rule_keys())
    match = _parse_match(keys)
    spelling = keys.choice("method", registry.recipe_methods(), required=True)
    takes = registry.spelling_keys(spelling)
    method_keys = registry.all_recipe_keys()
    extra = [k for k in raw if k in method_keys and k not in takes]
    if extra:
        keys.fail(
            f"key {extra[0]!r} does not apply to method {spelling!r} (it takes: "
            f"{', '.join(takes) or 'no further keys'})"
        )
    min_rows = keys.get("min_rows", INTEGER, minimum=0)
    max_rows = keys.get("max_rows", INTEGER, minimum=0)
    if min_rows is not None and max_rows is not None and min_rows > max_rows:
        keys.fail(f"min_rows {min_rows} > max_rows {max_rows}: the rule matches nothing")
    config = registry.for_recipe(spelling, keys).parse(spelling, keys)
    return TableRule(match, config, min_rows, max_rows)


def _parse_match(keys: Keys) -> tuple[str, ...]:
    if not keys.has("match"):
        keys.fail("missing required key 'match' (a list of table-name patterns)")
    patterns = keys.raw["match"]
    if not isinstance(patterns, list) or not patterns:
        keys.fail(f"match must be a non-empty list of strings, got {show(patterns)}")
    for j, p in enumerate(patterns):
        if not isinstance(p, str) or not p or p == REGEX_PREFIX:
            keys.fail(f"match[{j}] must be a non-empty pattern string, got {show(p)}")
        if p.startswith(REGEX_PREFIX):
            try:
                re.compile(p[len(REGEX_PREFIX) :])
            except re.error as e:
                keys.fail(f"match[{j}] {p!r}: invalid regular expression: {e}")
    return tuple(patterns)


def _parse_mlp(raw: dict, source: str) -> MLPSettings:
    keys = Keys(raw, source, "mlp")
    keys.check_known(MLP_KEYS)
    method = keys.choice("method", MLP_METHODS, required=True)
    if method == "keep":
        extra = [k for k in raw if k != "method"]
        if extra:
            keys.fail(f"key {extra[0]!r} does not apply to method 'keep'")
        return MLPSettings(method="keep")
    bits = keys.choice("bits", MLP_BITS, required=True)
    if keys.get("per_channel", BOOLEAN) is False:
        keys.fail(
            "per_channel = false is not supported: MLP weights are quantized per output channel"
        )
    activations = keys.choice("activations", MLP_ACTIVATIONS) or "fp32"
    return MLPSettings(method=method, bits=bits, per_channel=True, activations=activations)


def _get_table(data: dict, key: str, source: str) -> dict:
    value = data[key]
    if not isinstance(value, dict):
        fail(source, "", f"'{key}' must be a table ([{key}]), got {kind_of(value)}")
    return value


_FINETUNE_LIMITS: dict[str, tuple[str, float]] = {
    "steps": (">=", 1),
    "epochs": (">", 0),
    "batch_size": (">=", 1),
    "lr_embedding": (">", 0),
    "lr_dense": (">", 0),
    "eval_every": (">=", 0),
    "eval_batch_size": (">=", 1),
    "seed": (">=", 0),
    "checkpoint_every": (">=", 1),
}


#: Upper bounds: learning rates become float32 tensors, every integer (seed, steps, sizes) an
#: int64 (``torch.manual_seed`` and numpy overflow beyond it).
INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
_FINETUNE_MAX: dict[str, float] = {"lr_embedding": FLOAT32_MAX, "lr_dense": FLOAT32_MAX}
#: The length of a run (:data:`compress.train.config.MAX_STEPS`, ``MAX_EPOCHS``).
_FINETUNE_RUN_MAX: dict[str, int] = {"steps": MAX_STEPS, "epochs": MAX_EPOCHS}


def _parse_finetune(raw: dict, source: str) -> TrainConfig:
    where = "finetune"
    Keys(raw, source, where).check_known(FINETUNE_KEYS)
    hints = typing.get_type_hints(TrainConfig)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        longest = _FINETUNE_RUN_MAX.get(key)  # before coercion: float(10**400) would overflow
        if longest is not None and is_real(value) and value > longest:
            shown = show(value) if len(show(value)) <= 24 else f"{show(value)[:12]}..."
            fail(
                source,
                where,
                f"{key} must be <= {longest:,} (the longest fine-tuning run accepted), got {shown}",
            )
        values[key] = _coerce(value, hints[key], source, where, key)
        if key in _FINETUNE_LIMITS:
            op, bound = _FINETUNE_LIMITS[key]
            ok = values[key] > bound if op == ">" else values[key] >= bound
            if not ok:
                fail(source, where, f"{key} must be {op} {bound:g}, got {show(value)}")
        is_int = isinstance(values[key], int) and not isinstance(values[key], bool)
        upper = _FINETUNE_MAX.get(key, INT64_MAX if is_int else None)
        if upper is not None and values[key] > upper:
            kind = "int64" if is_int else "float32"
            fail(source, where, f"{key} must be <= {upper!r} ({kind} range), got {show(value)}")
    for key, choices in (
        ("optimizer", OPTIMIZERS),
        ("dense_optimizer", DENSE_OPTIMIZERS),
        ("select_on", SELECT_METRICS),
        ("embedding_grad_bits", GRAD_BITS),
        ("mlp_grad_bits", GRAD_BITS),
        ("target", TARGETS),
    ):
        if key in values and values[key] not in choices:
            fail(
                source,
                where,
                f"{key} must be one of {show_choices(choices)}, got {show(values[key])}",
            )
    return TrainConfig(**values)


def _coerce(value: Any, hint: Any, source: str, where: str, key: str) -> Any:
    """``value`` checked against a TrainConfig field type (``int``, ``float``, ``bool``, ``str``,
    or one of them ``| None``; TOML has no null, so the ``None`` branch is never taken)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"TrainConfig.{key}: unsupported type {hint}")
        hint = inner[0]
    kinds = {bool: BOOLEAN, int: INTEGER, float: _FLOAT, str: STRING}
    if hint not in kinds:
        raise TypeError(f"TrainConfig.{key}: unsupported type {hint}")
    return Keys({key: value}, source, where).get(key, kinds[hint])
