"""Compression recipes: what each embedding table and the MLPs become, and how to fine-tune.

A recipe is a TOML file, read with :mod:`tomllib` and validated strictly: an unknown key, a value of
the wrong type or range, or settings that contradict each other raise
:class:`~compress.errors.RecipeError` with one line naming the file and the ``tables[i]`` rule, the
``mlp`` or ``finetune`` table, and the key at fault. Recipes round-trip:
``parse_recipe(recipe_to_toml(r)) == r``.

Schema (every key; "required" keys have no default)::

    name = "int4_qat"                # str, required, non-empty
    description = "..."              # str, default ""

    [[tables]]                       # rules, in order; none at all keeps every table as it is
    match = ["*", "re:t_cat_\\d+"]   # list of str, required, non-empty: fnmatch globs
                                     #   (case-sensitive) or "re:<regex>" (re.fullmatch)
    min_rows = 100                   # int >= 0, optional: the rule applies when rows >= min_rows
    max_rows = 9999                  # int >= 0, optional: ... and rows <= max_rows
    method = "qat"                   # str, required: keep | fp16 | ptq | qat | share
    # ptq and qat:
    bits = 4                         # int, required: 8 | 4 | 2
    granularity = "row"              # str, default "row": "row" = FBGEMM row-wise asymmetric,
                                     #   fp16 scale+bias per row; "table" = DQRM, one symmetric
                                     #   scale per table
    scale_refresh = 200              # int >= 1, default 200, qat + granularity "table" only:
                                     #   steps between the table-wide max|W| scans (DQRM's P)
    # share (ROBE-Z parameter sharing; tables of one group read one flat array M):
    compression = 1000.0             # float > 1: M holds ceil(rows_total*dim / compression) values
    bytes = 10_000_000               # int > 0: or M's size in bytes (give exactly one of the two)
    block_size = 32                  # int >= 1, required: Z, contiguous dims read together
    group = "big"                    # str, optional: rules naming one group share one array (their
                                     #   share keys must agree); default: each rule its own array
    array_dtype = "fp32"             # str, default "fp32": fp32 | fp16 | int8 (int8 adds one fp32
                                     #   scale)
    projection = "frequency"         # str, default "frequency": how the trained tables initialise
                                     #   M: least squares weighted by how often each row occurs in
                                     #   the training data ("frequency"; plain "mean" without data)
                                     #   or the unweighted mean of the values hashed to each cell

    [mlp]                            # optional; absent = method "keep"
    method = "qat"                   # str, required: keep | ptq | qat
    bits = 4                         # int, required for ptq/qat: 8 | 4
    per_channel = true               # bool, default true (only per-output-channel is implemented)

    [finetune]                       # keys are exactly compress.train.config.TrainConfig's fields; a
    epochs = 1.0                     #   missing key takes TrainConfig's default. Required when a
    batch_size = 2048                #   rule uses qat or share or the MLP uses qat, and an error
    ...                              #   when nothing is trained. Integers (seed, steps, sizes)
                                     #   must fit int64, learning rates float32.
    select_on = "logloss"            # str, default "logloss": keep_best keeps the evaluation with
                                     #   the lowest log loss ("logloss") or highest AUC ("auc") on
                                     #   the selection slice (compress.train.validation)

Keys that do not apply to a rule's method (``bits`` on a ``keep`` rule, ``scale_refresh`` on a
row-wise rule) are errors, not ignored. A rule placed after a catch-all rule (``match = ["*"]`` or
``["re:.*"]`` with no row bounds) could never apply and is an error. Which rule decides which table
is :mod:`compress.plan`'s business.

Example::

    >>> r = load_recipe("int4_qat")
    >>> (r.rules[0].bits, r.rules[0].granularity, r.mlp.method)
    (4, 'table', 'qat')
    >>> parse_recipe(recipe_to_toml(r)) == r
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from compress.errors import RecipeError
from compress.train.config import (
    DEFAULT_SCALE_REFRESH,
    OPTIMIZERS,
    SELECT_METRICS,
    TrainConfig,
)

TABLE_METHODS = ("keep", "fp16", "ptq", "qat", "share")
MLP_METHODS = ("keep", "ptq", "qat")
TABLE_BITS = (8, 4, 2)
MLP_BITS = (8, 4)
GRANULARITIES = ("row", "table")
ARRAY_DTYPES = ("fp32", "fp16", "int8")
DEFAULT_GRANULARITY = "row"
DEFAULT_ARRAY_DTYPE = "fp32"
REGEX_PREFIX = "re:"
SPARSE_OPTIMIZERS = ("adagrad", "sgd")
BUILTIN_PACKAGE = "recipes"

TOP_KEYS = ("name", "description", "tables", "mlp", "finetune")
RULE_KEYS = (
    "match",
    "min_rows",
    "max_rows",
    "method",
    "bits",
    "granularity",
    "scale_refresh",
    "compression",
    "bytes",
    "block_size",
    "group",
    "array_dtype",
    "projection",
)
MLP_KEYS = ("method", "bits", "per_channel")
FINETUNE_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))

_METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "keep": (),
    "fp16": (),
    "ptq": ("bits", "granularity"),
    "qat": ("bits", "granularity", "scale_refresh"),
    "share": ("compression", "bytes", "block_size", "group", "array_dtype", "projection"),
}
_SHARE_GROUP_KEYS = ("compression", "bytes", "block_size", "array_dtype", "projection")
PROJECTIONS = ("frequency", "mean")
#: How a shared array is initialised when the recipe does not say.
DEFAULT_PROJECTION = PROJECTIONS[0]
_CATCH_ALL = ("*", "re:.*")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a ``match`` pattern selects table ``name``: ``re:<regex>`` with :func:`re.fullmatch`,
    anything else as a case-sensitive glob (:func:`fnmatch.fnmatchcase`)."""
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX) :], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class TableRule:
    """One ``[[tables]]`` entry: which tables (``match`` and row bounds) get which ``method``.

    Fields that do not apply to ``method`` are ``None``. For ``ptq``/``qat`` ``bits`` and
    ``granularity`` are set; ``scale_refresh`` is set for ``qat`` with ``granularity="table"``
    only. For ``share`` exactly one of ``compression``/``bytes`` is set, plus ``block_size`` and
    ``array_dtype`` (``group`` optional).
    """

    match: tuple[str, ...]
    method: str
    min_rows: int | None = None
    max_rows: int | None = None
    bits: int | None = None
    granularity: str | None = None
    scale_refresh: int | None = None
    compression: float | None = None
    bytes: int | None = None
    block_size: int | None = None
    group: str | None = None
    array_dtype: str | None = None
    projection: str | None = None

    def matches_name(self, name: str) -> bool:
        """Whether any of the rule's patterns selects ``name`` (row bounds not considered)."""
        return any(pattern_matches(p, name) for p in self.match)

    def fits_rows(self, rows: int) -> bool:
        """Whether ``min_rows <= rows <= max_rows`` (bounds inclusive, absent = unbounded)."""
        lo_ok = self.min_rows is None or rows >= self.min_rows
        return lo_ok and (self.max_rows is None or rows <= self.max_rows)

    def matches(self, name: str, rows: int) -> bool:
        """Whether the rule applies to a table of ``rows`` rows named ``name``."""
        return self.matches_name(name) and self.fits_rows(rows)

    @property
    def is_catch_all(self) -> bool:
        """Matches every table whatever its size."""
        no_bounds = self.min_rows is None and self.max_rows is None
        return no_bounds and any(p in _CATCH_ALL for p in self.match)

    def describe(self) -> str:
        """One line, e.g. ``* rows>=10000: qat INT4 row``."""
        return f"{', '.join(self.match)}{_bounds_text(self)}: {self.method_text()}"

    def method_text(self) -> str:
        """The method and its settings, e.g. ``qat INT4 table P=200``."""
        if self.method in ("ptq", "qat"):
            text = f"{self.method} INT{self.bits} {self.granularity}"
            return text + (f" P={self.scale_refresh}" if self.scale_refresh is not None else "")
        if self.method == "share":
            size = f"1/{self.compression:g}" if self.compression is not None else f"{self.bytes} B"
            group = f" group={self.group}" if self.group is not None else ""
            return f"share {size} Z={self.block_size} {self.array_dtype}{group}"
        return self.method


def _bounds_text(rule: TableRule) -> str:
    if rule.min_rows is not None and rule.max_rows is not None:
        return f" rows {rule.min_rows}..{rule.max_rows}"
    if rule.min_rows is not None:
        return f" rows>={rule.min_rows}"
    if rule.max_rows is not None:
        return f" rows<={rule.max_rows}"
    return ""


@dataclass(frozen=True)
class MLPSettings:
    """The ``[mlp]`` table: every ``nn.Linear`` of the dense arch, projection branches and over
    arch. ``bits`` is set for ``ptq``/``qat`` only; weights are quantized per output channel."""

    method: str = "keep"
    bits: int | None = None
    per_channel: bool = True

    def describe(self) -> str:
        return self.method if self.bits is None else f"{self.method} INT{self.bits} per-channel"


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``finetune`` is ``None`` when nothing is trained. ``source`` (the file it
    came from, for messages) does not take part in equality."""

    name: str
    description: str
    rules: tuple[TableRule, ...]
    mlp: MLPSettings
    finetune: TrainConfig | None
    source: str = field(default="<memory>", compare=False)

    @property
    def needs_finetune(self) -> bool:
        """Whether any rule uses ``qat``/``share`` or the MLP uses ``qat``."""
        return bool(_training_parts(self.rules, self.mlp))


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
    return _load_path(_builtin_dir() / f"{text}.toml")


def builtin_names() -> list[str]:
    """Names of the built-in recipes (the ``recipes/*.toml`` files), sorted."""
    return sorted(
        p.name[: -len(".toml")] for p in _builtin_dir().iterdir() if p.name.endswith(".toml")
    )


def builtin_recipes() -> list[tuple[str, str]]:
    """``(name, description)`` of every built-in recipe, sorted by name."""
    return [(name, load_recipe(name).description) for name in builtin_names()]


def _builtin_dir() -> Path:
    return Path(str(resources.files(BUILTIN_PACKAGE)))


def _load_path(path: Path) -> Recipe:
    if path.suffix != ".toml":
        raise RecipeError(f"{path}: a recipe file must be a .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise RecipeError(f"{path}: no such recipe file") from e
    except IsADirectoryError as e:
        raise RecipeError(f"{path}: is a directory, not a recipe file") from e
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return parse_recipe(text, str(path))


def parse_recipe(text: str, source: str = "<string>") -> Recipe:
    """Parse and validate recipe TOML ``text``; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(_syntax_message(str(e), text, source)) from e
    return recipe_from_dict(data, source)


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
    _check_keys(data, TOP_KEYS, source, "")
    name = _get_str(data, "name", source, "", required=True)
    description = _get_str(data, "description", source, "") or ""
    raw_rules = data.get("tables", [])
    if not isinstance(raw_rules, list):
        _fail(
            source, "", f"'tables' must be an array of tables ([[tables]]), got {_kind(raw_rules)}"
        )
    rules = tuple(_parse_rule(raw, i, source) for i, raw in enumerate(raw_rules))
    mlp = _parse_mlp(_get_table(data, "mlp", source), source) if "mlp" in data else MLPSettings()
    finetune = None
    if "finetune" in data:
        finetune = _parse_finetune(_get_table(data, "finetune", source), source)
    recipe = Recipe(name, description, rules, mlp, finetune, source)
    check_recipe(recipe)
    return recipe


def check_recipe(recipe: Recipe) -> None:
    """Whole-recipe checks: fine-tuning present exactly when something trains, a sparse-capable
    optimizer when tables train, no rule after a catch-all, share groups that agree on the array."""
    source = recipe.source
    training = _training_parts(recipe.rules, recipe.mlp)
    if training and recipe.finetune is None:
        where, method = training[0]
        _fail(
            source,
            where,
            f"method {method!r} needs fine-tuning but the recipe has no [finetune] table",
        )
    if not training and recipe.finetune is not None:
        _fail(
            source,
            "finetune",
            "nothing is fine-tuned (no rule uses qat or share and the MLP is not qat): "
            "remove [finetune]",
        )
    trained_tables = [where for where, _ in training if where != "mlp"]
    if (
        recipe.finetune is not None
        and trained_tables
        and recipe.finetune.optimizer not in SPARSE_OPTIMIZERS
    ):
        _fail(
            source,
            "finetune",
            f"optimizer {recipe.finetune.optimizer!r} cannot take the sparse embedding gradients "
            f"that {trained_tables[0]} trains with (use {_choices(SPARSE_OPTIMIZERS)})",
        )
    for i, rule in enumerate(recipe.rules):
        if rule.is_catch_all and i + 1 < len(recipe.rules):
            _fail(
                source,
                f"tables[{i + 1}]",
                f"can never apply: tables[{i}] matches every table ({', '.join(rule.match)} with "
                "no row bounds); put catch-all rules last",
            )
    groups: dict[str, tuple[int, TableRule]] = {}
    for i, rule in enumerate(recipe.rules):
        if rule.method != "share" or rule.group is None:
            continue
        if rule.group not in groups:
            groups[rule.group] = (i, rule)
            continue
        j, first = groups[rule.group]
        for key in _SHARE_GROUP_KEYS:
            if getattr(rule, key) != getattr(first, key):
                _fail(
                    source,
                    f"tables[{i}]",
                    f"group {rule.group!r} has {key} {_show(getattr(first, key))} in tables[{j}] "
                    f"but {_show(getattr(rule, key))} here (one group is one array)",
                )


def _training_parts(rules: Iterable[TableRule], mlp: MLPSettings) -> list[tuple[str, str]]:
    """``(where, method)`` of every rule, and the MLP, whose method trains."""
    parts = [
        (f"tables[{i}]", r.method) for i, r in enumerate(rules) if r.method in ("qat", "share")
    ]
    return parts + ([("mlp", "qat")] if mlp.method == "qat" else [])


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def _parse_rule(raw: Any, index: int, source: str) -> TableRule:
    where = f"tables[{index}]"
    if not isinstance(raw, dict):
        _fail(source, where, f"must be a table, got {_kind(raw)}")
    _check_keys(raw, RULE_KEYS, source, where)
    match = _parse_match(raw, source, where)
    method = _get_choice(raw, "method", TABLE_METHODS, source, where, required=True)
    extra = [k for k in raw if k in RULE_KEYS[4:] and k not in _METHOD_KEYS[method]]
    if extra:
        takes = ", ".join(_METHOD_KEYS[method]) or "no further keys"
        _fail(
            source,
            where,
            f"key {extra[0]!r} does not apply to method {method!r} (it takes: {takes})",
        )
    min_rows = _get_int(raw, "min_rows", source, where, minimum=0)
    max_rows = _get_int(raw, "max_rows", source, where, minimum=0)
    if min_rows is not None and max_rows is not None and min_rows > max_rows:
        _fail(source, where, f"min_rows {min_rows} > max_rows {max_rows}: the rule matches nothing")
    common = {"match": match, "method": method, "min_rows": min_rows, "max_rows": max_rows}
    if method in ("ptq", "qat"):
        bits = _get_choice(raw, "bits", TABLE_BITS, source, where, required=True)
        granularity = _get_choice(raw, "granularity", GRANULARITIES, source, where)
        granularity = granularity or DEFAULT_GRANULARITY
        refresh = _get_int(raw, "scale_refresh", source, where, minimum=1)
        if refresh is not None and granularity != "table":
            _fail(
                source,
                where,
                "scale_refresh applies only to granularity 'table' (row-wise "
                "scales depend on the row alone)",
            )
        if method == "qat" and granularity == "table" and refresh is None:
            refresh = DEFAULT_SCALE_REFRESH
        return TableRule(**common, bits=bits, granularity=granularity, scale_refresh=refresh)
    if method == "share":
        return TableRule(**common, **_parse_share(raw, source, where))
    return TableRule(**common)


def _parse_match(raw: dict, source: str, where: str) -> tuple[str, ...]:
    if "match" not in raw:
        _fail(source, where, "missing required key 'match' (a list of table-name patterns)")
    patterns = raw["match"]
    if not isinstance(patterns, list) or not patterns:
        _fail(source, where, f"match must be a non-empty list of strings, got {_show(patterns)}")
    for j, p in enumerate(patterns):
        if not isinstance(p, str) or not p or p == REGEX_PREFIX:
            _fail(source, where, f"match[{j}] must be a non-empty pattern string, got {_show(p)}")
        if p.startswith(REGEX_PREFIX):
            try:
                re.compile(p[len(REGEX_PREFIX) :])
            except re.error as e:
                _fail(source, where, f"match[{j}] {p!r}: invalid regular expression: {e}")
    return tuple(patterns)


def _parse_share(raw: dict, source: str, where: str) -> dict[str, Any]:
    has_ratio, has_bytes = "compression" in raw, "bytes" in raw
    if has_ratio == has_bytes:
        _fail(
            source,
            where,
            "method 'share' needs exactly one of 'compression' (ratio > 1) or 'bytes' (array size)",
        )
    compression = None
    if has_ratio:
        compression = _get_float(raw, "compression", source, where)
        if compression is not None and compression <= 1:
            _fail(source, where, f"compression must be > 1, got {_show(raw['compression'])}")
    group = _get_str(raw, "group", source, where)
    if group == "":
        _fail(source, where, "group must be a non-empty name")
    return {
        "compression": compression,
        "bytes": _get_int(raw, "bytes", source, where, minimum=1),
        "block_size": _get_int(raw, "block_size", source, where, minimum=1, required=True),
        "group": group,
        "array_dtype": _get_choice(raw, "array_dtype", ARRAY_DTYPES, source, where)
        or DEFAULT_ARRAY_DTYPE,
        "projection": _get_choice(raw, "projection", PROJECTIONS, source, where)
        or DEFAULT_PROJECTION,
    }


def _parse_mlp(raw: dict, source: str) -> MLPSettings:
    where = "mlp"
    _check_keys(raw, MLP_KEYS, source, where)
    method = _get_choice(raw, "method", MLP_METHODS, source, where, required=True)
    if method == "keep":
        extra = [k for k in raw if k != "method"]
        if extra:
            _fail(source, where, f"key {extra[0]!r} does not apply to method 'keep'")
        return MLPSettings(method="keep")
    bits = _get_choice(raw, "bits", MLP_BITS, source, where, required=True)
    per_channel = _get_bool(raw, "per_channel", source, where)
    if per_channel is False:
        _fail(
            source,
            where,
            "per_channel = false is not supported: MLP weights are quantized per output channel",
        )
    return MLPSettings(method=method, bits=bits, per_channel=True)


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


def _parse_finetune(raw: dict, source: str) -> TrainConfig:
    where = "finetune"
    _check_keys(raw, FINETUNE_KEYS, source, where)
    hints = typing.get_type_hints(TrainConfig)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        values[key] = _coerce(value, hints[key], source, where, key)
        if key in _FINETUNE_LIMITS:
            op, bound = _FINETUNE_LIMITS[key]
            ok = values[key] > bound if op == ">" else values[key] >= bound
            if not ok:
                _fail(source, where, f"{key} must be {op} {bound:g}, got {_show(value)}")
        is_int = isinstance(values[key], int) and not isinstance(values[key], bool)
        upper = _FINETUNE_MAX.get(key, INT64_MAX if is_int else None)
        if upper is not None and values[key] > upper:
            kind = "int64" if is_int else "float32"
            _fail(source, where, f"{key} must be <= {upper!r} ({kind} range), got {_show(value)}")
    for key, choices in (
        ("optimizer", OPTIMIZERS),
        ("dense_optimizer", OPTIMIZERS),
        ("select_on", SELECT_METRICS),
    ):
        if key in values and values[key] not in choices:
            _fail(
                source,
                where,
                f"{key} must be one of {_choices(choices)}, got {_show(values[key])}",
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
    checks: dict[Any, tuple[Callable[[Any], bool], Callable[[Any], Any], str]] = {
        bool: (lambda v: isinstance(v, bool), bool, "true or false"),
        int: (lambda v: isinstance(v, int) and not isinstance(v, bool), int, "an integer"),
        float: (_is_number, float, "a number"),
        str: (lambda v: isinstance(v, str), str, "a string"),
    }
    if hint not in checks:
        raise TypeError(f"TrainConfig.{key}: unsupported type {hint}")
    is_ok, convert, what = checks[hint]
    if not is_ok(value):
        _fail(source, where, f"{key} must be {what}, got {_show(value)}")
    return convert(value)


# --------------------------------------------------------------------------------------------------
# Typed getters (all fail with a RecipeError naming source, section and key)
# --------------------------------------------------------------------------------------------------


def _fail(source: str, where: str, message: str) -> NoReturn:
    raise RecipeError(f"{source}: {where}: {message}" if where else f"{source}: {message}")


def _check_keys(raw: dict, allowed: tuple[str, ...], source: str, where: str) -> None:
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(allowed)})"
            _fail(
                source,
                where,
                f"unknown key {key!r}{hint}" if where else f"unknown top-level key {key!r}{hint}",
            )


def _get_table(data: dict, key: str, source: str) -> dict:
    value = data[key]
    if not isinstance(value, dict):
        _fail(source, "", f"'{key}' must be a table ([{key}]), got {_kind(value)}")
    return value


def _get_str(raw: dict, key: str, source: str, where: str, *, required: bool = False) -> str | None:
    if key not in raw:
        if required:
            _fail(source, where, f"missing required key {key!r}")
        return None
    value = raw[key]
    if not isinstance(value, str):
        _fail(source, where, f"{key} must be a string, got {_show(value)}")
    if required and not value:
        _fail(source, where, f"{key} must not be empty")
    return value


def _get_int(
    raw: dict, key: str, source: str, where: str, *, minimum: int, required: bool = False
) -> int | None:
    if key not in raw:
        if required:
            _fail(source, where, f"missing required key {key!r}")
        return None
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(source, where, f"{key} must be an integer, got {_show(value)}")
    if value < minimum:
        _fail(source, where, f"{key} must be >= {minimum}, got {value}")
    return value


def _get_float(raw: dict, key: str, source: str, where: str) -> float | None:
    if key not in raw:
        return None
    value = raw[key]
    if not _is_number(value):
        _fail(source, where, f"{key} must be a finite number, got {_show(value)}")
    return float(value)


def _get_bool(raw: dict, key: str, source: str, where: str) -> bool | None:
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, bool):
        _fail(source, where, f"{key} must be true or false, got {_show(value)}")
    return value


def _get_choice(
    raw: dict, key: str, choices: tuple, source: str, where: str, *, required: bool = False
) -> Any:
    if key not in raw:
        if required:
            _fail(source, where, f"missing required key {key!r} (one of {_choices(choices)})")
        return None
    value = raw[key]
    same_type = isinstance(value, type(choices[0])) and not isinstance(value, bool)
    if not same_type or value not in choices:
        _fail(source, where, f"{key} must be one of {_choices(choices)}, got {_show(value)}")
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _choices(choices: Iterable) -> str:
    return ", ".join(_show(c) for c in choices)


def _show(value: Any) -> str:
    """A value as TOML would spell it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def recipe_to_toml(recipe: Recipe) -> str:
    """The recipe as TOML that :func:`parse_recipe` reads back into an equal :class:`Recipe`.

    Every setting is written out, defaults included, so the file documents what will run.
    """
    lines = [
        f"name = {_toml_value(recipe.name)}",
        f"description = {_toml_value(recipe.description)}",
    ]
    for rule in recipe.rules:
        lines += ["", "[[tables]]"]
        for key in RULE_KEYS:
            value = getattr(rule, key)
            if value is not None:
                lines.append(f"{key} = {_toml_value(list(value) if key == 'match' else value)}")
    if recipe.mlp != MLPSettings():
        lines += ["", "[mlp]", f"method = {_toml_value(recipe.mlp.method)}"]
        if recipe.mlp.bits is not None:
            lines += [
                f"bits = {recipe.mlp.bits}",
                f"per_channel = {_toml_value(recipe.mlp.per_channel)}",
            ]
    if recipe.finetune is not None:
        lines += ["", "[finetune]"]
        for key in FINETUNE_KEYS:
            value = getattr(recipe.finetune, key)
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write non-finite float {value} to a recipe")
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a recipe")


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(s: str) -> str:
    """A TOML basic string (escapes quotes, backslashes and control characters)."""
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
