"""What a recipe is: the validated dataclasses, and the keys a recipe file may hold.

A recipe is a TOML file (read by :mod:`compress.recipe.parse`, written back by
:mod:`compress.recipe.toml_out`)::

    name = "int4_qat"                # str, required: [A-Za-z0-9_.-]+, not starting with "."
    description = "..."              # str, default ""
    budget = "3MB"                   # str or int, optional: fit the model into this size (bytes,
                                     #   KB/MB/GB, KiB/MiB/GiB, or "100x": the model's bytes / 100;
                                     #   compress.budget.spec). The main job chooses every table's
                                     #   method and the MLP's from data (compress.budget); the
                                     #   recipe then has no [[tables]] and no [mlp], and its
                                     #   [finetune], if any, fine-tunes whatever is chosen

    [[tables]]                       # rules, in order; none at all keeps every table as it is
    match = ["*", "re:t_cat_\\d+"]   # list of str, required, non-empty: fnmatch globs
                                     #   (case-sensitive) or "re:<regex>" (re.fullmatch)
    min_rows = 100                   # int >= 0, optional: the rule applies when rows >= min_rows
    max_rows = 9999                  # int >= 0, optional: ... and rows <= max_rows
    method = "qat"                   # str, required: a table method (below)
    ...                              # the method's own keys

    [mlp]                            # optional; absent = method "keep"
    method = "qat"                   # str, required: keep | ptq | qat
    bits = 4                         # int, required for ptq/qat: 8 | 4
    per_channel = true               # bool, default true (only per-output-channel is implemented)
    activations = "int8"             # str, ptq/qat only: "fp32" (default) | "int8": each linear's
                                     #   input quantized to static INT8 (ranges calibrated on
                                     #   the data) and served on integer GEMM kernels

    [finetune]                       # keys are exactly compress.train.config.TrainConfig's fields; a
    epochs = 1.0                     #   missing key takes TrainConfig's default. Required when a
    batch_size = 2048                #   rule's method trains (qat, share) or the MLP uses qat, and
    ...                              #   an error when nothing is trained, except in a recipe
                                     #   that keeps every table and the MLP (it fine-tunes the
                                     #   uncompressed model: a control run). Integers (seed, steps,
                                     #   sizes) must fit int64, learning rates float32.
    select_on = "logloss"            # str, default "logloss": keep_best keeps the evaluation with
                                     #   the lowest log loss ("logloss") or highest AUC ("auc") on
                                     #   the selection slice (compress.train.validation)

Table methods (:mod:`compress.methods.registry`; each validates its own keys):

* ``keep``: nothing more (:mod:`compress.methods.keep`). ``fp16``: nothing more.
* ``ptq`` / ``qat``: ``bits`` (int, required: 8 | 4 | 2); ``granularity`` (default ``"row"``:
  FBGEMM row-wise asymmetric, fp16 scale+bias per row, :mod:`compress.methods.rowwise`;
  ``"table"``: DQRM, one symmetric scale per table, :mod:`compress.methods.tablewise`);
  ``scale_refresh`` (int >= 1, default 200, ``qat`` with ``"table"`` only: steps between the
  table-wide ``max|W|`` scans, DQRM's P); ``ranges`` (``"minmax"`` | ``"l2"``: each row's range,
  or the table's scale, from its extremes or chosen for the least L2 error,
  :mod:`compress.quant.l2_ranges`; default ``"l2"`` for ``ptq`` with ``"row"`` at 2 bits,
  else ``"minmax"``).
* ``share`` (ROBE-Z, :mod:`compress.methods.robe.method`): ``compression`` (float > 1) or ``bytes``
  (int > 0), exactly one; ``block_size`` (int >= 1, required: Z); ``group`` (rules naming one
  group share one array; their share keys must agree); ``array_dtype`` (fp32 | fp16 | int8,
  default fp32); ``projection`` (frequency | mean, default frequency); ``hot_rows`` (int >= 0 or
  ``"auto"``: the group's most frequent rows in ``--data`` kept exact beside a smaller array, the
  same bytes, :mod:`compress.methods.robe.hot_rows`); ``hot_dtype`` (int8 | fp16, default int8,
  with ``hot_rows`` only).
* any other registered method, by its name, with the keys it declares.

Keys that do not apply to a rule's method (``bits`` on a ``keep`` rule, ``scale_refresh`` on a
row-wise rule) are errors, not ignored. A rule placed after a catch-all rule (``match = ["*"]`` or
``["re:.*"]`` with no row bounds) could never apply and is an error. Which rule decides which table
is :mod:`compress.plan`'s business.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from compress.budget.spec import Budget
from compress.methods import registry
from compress.methods.handler import MethodConfig, TableMethod
from compress.train.config import TrainConfig

MLP_METHODS = ("keep", "ptq", "qat")
MLP_BITS = (8, 4)
#: ``[mlp] activations``: float32 inputs, or static INT8 (:mod:`compress.quant.activation`).
MLP_ACTIVATIONS = ("fp32", "int8")
REGEX_PREFIX = "re:"
TOP_KEYS = ("name", "description", "budget", "tables", "mlp", "finetune")
#: Keys of every rule, whatever its method (the method's own keys follow: :func:`rule_keys`).
COMMON_RULE_KEYS = ("match", "min_rows", "max_rows", "method")
MLP_KEYS = ("method", "bits", "per_channel", "activations")
FINETUNE_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_CATCH_ALL = ("*", "re:.*")


def rule_keys() -> tuple[str, ...]:
    """Every key a ``[[tables]]`` rule may hold: the common ones, then every registered
    method's."""
    return COMMON_RULE_KEYS + registry.all_recipe_keys()


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a ``match`` pattern selects table ``name``: ``re:<regex>`` with :func:`re.fullmatch`,
    anything else as a case-sensitive glob (:func:`fnmatch.fnmatchcase`)."""
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX) :], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class TableRule:
    """One ``[[tables]]`` entry: which tables (``match`` and row bounds) get which method, with
    which settings (``config``, the method's own dataclass)."""

    match: tuple[str, ...]
    config: MethodConfig
    min_rows: int | None = None
    max_rows: int | None = None

    @property
    def table_method(self) -> TableMethod:
        return registry.for_config(self.config)

    @property
    def method(self) -> str:
        """The recipe's spelling of the method (``qat``, ``share``, ...)."""
        return self.table_method.fields(self.config).method

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
        return self.table_method.describe(self.config)


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
    arch. ``bits`` is set for ``ptq``/``qat`` only; weights are quantized per output channel.
    ``activations``: ``"int8"`` quantizes each linear's input to static INT8 (``ptq``/``qat``)."""

    method: str = "keep"
    bits: int | None = None
    per_channel: bool = True
    activations: str = "fp32"

    def describe(self) -> str:
        if self.bits is None:
            return self.method
        acts = ", INT8 activations" if self.activations == "int8" else ""
        return f"{self.method} INT{self.bits} per-channel{acts}"


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
    #: ``budget = ...``: the tables and the MLP are chosen to fit it (:mod:`compress.budget`);
    #: such a recipe has no rules and no ``[mlp]``, and is resolved into one that has
    budget: Budget | None = None

    @property
    def needs_finetune(self) -> bool:
        """Whether any rule's method trains (``qat``, ``share``), the MLP uses ``qat``, or the
        recipe only fine-tunes (:attr:`only_finetunes`)."""
        return bool(training_parts(self.rules, self.mlp)) or self.only_finetunes

    @property
    def only_finetunes(self) -> bool:
        """Whether the recipe keeps every table and the MLP as they are and has ``[finetune]``:
        it fine-tunes the uncompressed model (a control run, as ``--control`` runs it)."""
        return (
            self.finetune is not None
            and self.budget is None
            and self.mlp.method == "keep"
            and not any(r.table_method.changes_tables for r in self.rules)
        )


def training_parts(rules: Iterable[TableRule], mlp: MLPSettings) -> list[tuple[str, str]]:
    """``(where, method)`` of every rule, and the MLP, whose method trains."""
    parts = [
        (f"tables[{i}]", r.method) for i, r in enumerate(rules) if r.table_method.trains(r.config)
    ]
    return parts + ([("mlp", "qat")] if mlp.method == "qat" else [])
