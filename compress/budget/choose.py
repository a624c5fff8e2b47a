"""A size budget -> the recipe that fits it with the least predicted loss (the main job's
``--budget``, or ``budget = ...`` in a recipe).

1. Every table's options and the MLP's, with their exact bytes (:mod:`compress.budget.options`);
   a budget below the smallest choice, or at least the model as it is, stops here, before any
   data is read.
2. Their cost: the log-loss increase of each option alone, measured on the first rows (at most
   :data:`~compress.budget.sensitivity.DEFAULT_ROWS`) of the validation data's selection slice
   (:mod:`compress.budget.sensitivity`), the rows that already choose the fine-tuning step:
   never the rows the metrics are reported on, never training rows. An option that no choice
   within the budget can hold (its bytes with every other item's smallest option exceed it) is
   not measured (:func:`fitting`).
3. The exact multiple-choice knapsack over (bytes, cost) (:mod:`compress.budget.knapsack`):
   the least summed cost whose bytes, with the bytes no option changes (DCN cross layers), are
   at most the budget. The hot-row variant of a shared array is measured only when the array is
   chosen, then the knapsack is solved again, until no chosen array has an unmeasured variant:
   the choice is exact over every option measured.
4. The choice as a recipe, one rule per table (:func:`~compress.budget.options.budget_recipe`),
   planned: the plan's ``bytes_after`` is checked to equal the chosen bytes. Fine-tuning: when
   a chosen option trains (a shared array), or the budget recipe has ``[finetune]``, the recipe
   fine-tunes with those settings (default: the built-in ``mixed_robe_int4``'s, which mixes
   sharing and QAT) and its post-training choices become QAT at the same width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from compress.budget import knapsack
from compress.budget.options import (
    Option,
    budget_recipe,
    fixed_bytes,
    mlp_options,
    table_options,
)
from compress.budget.sensitivity import (
    DEFAULT_ROWS,
    SliceCache,
    baseline_logloss,
    cache_slice,
    measure,
)
from compress.budget.spec import Budget, BudgetError
from compress.errors import ModelConfigError
from compress.io.model import LoadedModel
from compress.io.model_spec import DLRMSpec, TableSpec, graph_name_problem
from compress.io.summary import format_bytes
from compress.plan import Plan, make_plan
from compress.recipe.schema import Recipe
from compress.train.config import TrainConfig

#: The built-in recipe whose ``[finetune]`` a budget run fine-tunes with by default.
FINETUNE_FROM = "mixed_robe_int4"
MLP_ITEM = "(mlp)"


@dataclass(frozen=True)
class Chosen:
    """One item (a table, or :data:`MLP_ITEM`) and its chosen option, with its measured cost and
    every option considered as ``(option, cost)``."""

    item: str
    option: Option
    cost: float
    considered: tuple[tuple[Option, float], ...]


@dataclass(frozen=True)
class BudgetChoice:
    """What a budget chose and why (``to_json`` is ``--json``'s and the manifest's ``budget``)."""

    budget: Budget
    budget_bytes: int
    model_bytes: int
    min_bytes: int
    planned_bytes: int
    predicted: float
    baseline_logloss: float
    rows: int
    slice_name: str | None
    chosen: tuple[Chosen, ...]
    recipe: Recipe

    def to_json(self, options: bool = False) -> dict:
        """JSON-ready; ``options`` adds every option considered with its bytes and cost."""

        def item(c: Chosen) -> dict:
            out = {
                "name": c.item,
                "option": c.option.label,
                "bytes": c.option.nbytes,
                "predicted_logloss_increase": c.cost,
            }
            if options:
                out["options"] = [
                    {"option": o.label, "bytes": o.nbytes, "predicted_logloss_increase": cost}
                    for o, cost in c.considered
                ]
            return out

        return {
            "budget": self.budget.text,
            "budget_bytes": self.budget_bytes,
            "model_bytes": self.model_bytes,
            "min_bytes": self.min_bytes,
            "planned_bytes": self.planned_bytes,
            "predicted_logloss_increase": self.predicted,
            "baseline_logloss": self.baseline_logloss,
            "measured_on": {"slice": self.slice_name, "rows": self.rows},
            "tables": [item(c) for c in self.chosen if c.item != MLP_ITEM],
            "mlp": next(item(c) for c in self.chosen if c.item == MLP_ITEM),
            "finetune": self.recipe.finetune is not None,
            "recipe_file": RECIPE_FILE,
        }

    def describe(self) -> str:
        """The choice for the terminal: one line per item, then the totals."""
        width = max(len(c.item) for c in self.chosen)
        label = max(len(c.option.label) for c in self.chosen)
        lines = [
            f"budget: {self.budget.describe(self.model_bytes)}; the smallest choice takes "
            f"{self.min_bytes:,} bytes",
            f"measured on {self.rows:,} rows of {self.slice_name}: baseline log loss "
            f"{self.baseline_logloss:.5f}",
            "",
            f"{'item':<{width}}  {'chosen':<{label}}  {'bytes':>12}  predicted loss",
        ]
        for c in self.chosen:
            lines.append(
                f"{c.item:<{width}}  {c.option.label:<{label}}  {c.option.nbytes:>12,}  "
                f"{c.cost:+.6f}"
            )
        lines += [
            "",
            f"planned {self.planned_bytes:,} bytes ({format_bytes(self.planned_bytes)}) of "
            f"{self.budget_bytes:,}; predicted log-loss increase {self.predicted:+.6f} before "
            f"fine-tuning; {'fine-tunes' if self.recipe.finetune is not None else 'no fine-tuning'}",
        ]
        return "\n".join(lines)


#: The file the chosen recipe is saved as in the artifacts.
RECIPE_FILE = "recipe.toml"


@dataclass(frozen=True)
class Limits:
    """A budget against a model: ``budget_bytes``, the model's bytes (``plan``'s
    ``bytes_before``), the fewest bytes any choice takes and the bytes no option changes."""

    budget_bytes: int
    model_bytes: int
    min_bytes: int
    fixed_bytes: int


def model_options(spec: DLRMSpec) -> list[list[Option]]:
    """Every item's options: each table's (model order), then the MLP's."""
    return [table_options(t) for t in spec.tables] + [mlp_options(spec)]


def check_budget(budget: Budget, spec: DLRMSpec, items: list[list[Option]]) -> Limits:
    """The budget in bytes for ``spec`` whose items have these options; :class:`BudgetError`
    when no choice fits it, or when the model fits it as it is (nothing to compress)."""
    fixed = fixed_bytes(spec)
    before = bytes_before(spec)
    limit = budget.resolve(before)
    floor = fixed + sum(min(o.nbytes for o in options) for options in items)
    kept = fixed + sum(next(o.nbytes for o in options if o.is_keep) for options in items)
    where = f"--budget {budget.describe(before)}"
    if limit < floor:
        raise BudgetError(
            f"{where} is less than this model can take: at least {floor:,} bytes "
            f"({format_bytes(floor)}: every table and the MLP at its smallest option)"
        )
    if limit >= kept:
        raise BudgetError(
            f"{where} holds the model as it is ({kept:,} bytes): nothing to compress; give a "
            "smaller budget"
        )
    return Limits(limit, before, floor, fixed)


def solve_measured(
    items: list[list[Option]], costs: dict[tuple[int, int], float], room: int
) -> tuple[list[int], knapsack.Solution]:
    """The exact choice (an option index per item) among the options measured so far (``costs``
    by ``(item, option)``) within ``room`` bytes."""
    measured = [
        [k for k in range(len(options)) if (j, k) in costs] for j, options in enumerate(items)
    ]
    problem = [[(items[j][k].nbytes, costs[(j, k)]) for k in ks] for j, ks in enumerate(measured)]
    solution = knapsack.solve(problem, room)
    return [measured[j][k] for j, k in enumerate(solution.choice)], solution


def refinements(items: list[list[Option]], choice: list[int]) -> list[tuple[int, int]]:
    """``(item, option)`` of the options that refine a chosen one (hot rows beside a chosen
    shared array)."""
    return [
        (j, k)
        for j, options in enumerate(items)
        for k, o in enumerate(options)
        if o.refines is not None and o.refines == options[choice[j]].rule
    ]


@dataclass
class Measured:
    """The options of every item (the tables in model order, then the MLP) and the costs
    measured so far, by ``(item, option)``, with what measuring more needs: a budget's choice
    (:func:`choose`) measures only the options it needs."""

    job: LoadedModel
    items: list[list[Option]]
    cache: SliceCache
    baseline: float
    counts: dict | None
    slice_name: str | None
    costs: dict[tuple[int, int], float]

    @classmethod
    def start(
        cls,
        job: LoadedModel,
        items: list[list[Option]],
        select,
        slice_name: str | None,
        train=None,
        max_rows: int = DEFAULT_ROWS,
    ) -> Measured:
        """Read the rows (at most ``max_rows`` of ``select``) and the training row counts; no
        option of ``items`` (:func:`model_options`) measured yet."""
        spec = job.spec
        counts = None
        if train is not None:
            from compress.pipeline import row_counts

            counts = row_counts(train, spec)
        cache = cache_slice(job.module, spec, select, max_rows)
        return cls(job, items, cache, baseline_logloss(job.module, cache), counts, slice_name, {})

    def measure(self, todo: list[tuple[int, int]], desc: str, say=None) -> None:
        """Measure the options ``todo`` (``(item, option)``) not measured yet."""
        todo = [jk for jk in todo if jk not in self.costs]
        if not todo:
            return
        if say is not None:
            say(f"budget: measuring {len(todo)} options on {self.cache.n:,} rows ({desc})")
        spec = self.job.spec
        tables: list[TableSpec | None] = [*spec.tables, None]
        work = [(tables[j], self.items[j][k]) for j, k in todo]
        costs = measure(self.job.module, spec, self.cache, work, self.baseline, self.counts, desc)
        self.costs.update(zip(todo, costs, strict=True))

    def solve(self, room: int, say=None) -> tuple[list[int], knapsack.Solution]:
        """The exact choice within ``room`` bytes over every plain option that can fit, then
        over the refinements of what it chose (hot rows beside a chosen array), until none is
        new. An option that cannot fit (its bytes and the smallest options of every other item
        exceed ``room``) is never measured: no choice within the room holds it."""
        fits = fitting(self.items, room)
        plain = [(j, k) for j, k in fits if self.items[j][k].refines is None]
        self.measure(plain, "sensitivity", say)
        while True:
            choice, solution = solve_measured(self.items, self.costs, room)
            todo = [jk for jk in refinements(self.items, choice) if jk in fits]
            todo = [jk for jk in todo if jk not in self.costs]
            if not todo:
                return choice, solution
            self.measure(todo, "hot rows", say)


def fitting(items: list[list[Option]], room: int) -> set[tuple[int, int]]:
    """``(item, option)`` of every option that some choice within ``room`` bytes holds: its
    bytes with the smallest option of every other item fit."""
    floors = [min(o.nbytes for o in options) for options in items]
    spare = room - sum(floors)
    return {
        (j, k)
        for j, options in enumerate(items)
        for k, o in enumerate(options)
        if o.nbytes - floors[j] <= spare
    }


def choose(
    job: LoadedModel,
    budget: Budget,
    select,
    *,
    slice_name: str | None,
    train=None,
    finetune: TrainConfig | None = None,
    max_rows: int = DEFAULT_ROWS,
    say: Callable[[str], None] | None = None,
) -> tuple[Plan, BudgetChoice]:
    """The plan that fits ``budget`` (module docstring) and how it was chosen. ``select``: the
    held-out rows the options are measured on (in memory or streamed); ``train``: the training
    data whose row counts weight the shared arrays' projection (``None``: unweighted);
    ``finetune``: the budget recipe's ``[finetune]`` (fine-tune whatever is chosen)."""
    spec = job.spec
    items = model_options(spec)
    limits = check_budget(budget, spec, items)  # before any data is read
    measured = Measured.start(job, items, select, slice_name, train, max_rows)
    choice, solution = measured.solve(limits.budget_bytes - limits.fixed_bytes, say)
    costs = measured.costs
    names = [t.name for t in spec.tables] + [MLP_ITEM]
    chosen = tuple(
        Chosen(
            name,
            items[j][choice[j]],
            costs[(j, choice[j])],
            tuple((o, costs[(j, k)]) for k, o in enumerate(items[j]) if (j, k) in costs),
        )
        for j, name in enumerate(names)
    )
    planned = limits.fixed_bytes + solution.bytes
    rows = measured.cache.n
    recipe = budget_recipe(
        budget.name,
        _description(budget, limits.model_bytes, planned, solution.loss, rows, slice_name),
        spec,
        {c.item: c.option for c in chosen if c.item != MLP_ITEM},
        chosen[-1].option,
        _finetune(chosen, finetune),
    )
    plan = make_plan(recipe, spec)
    if (
        plan.bytes_after != planned
        or planned > limits.budget_bytes
        or plan.bytes_before != limits.model_bytes
    ):
        raise AssertionError(  # one byte accounting: the plan's is the options'
            f"budget plan takes {plan.bytes_after:,} of {plan.bytes_before:,} bytes, the choice "
            f"counted {planned:,} of {limits.model_bytes:,}"
        )
    report = BudgetChoice(
        budget=budget,
        budget_bytes=limits.budget_bytes,
        model_bytes=limits.model_bytes,
        min_bytes=limits.min_bytes,
        planned_bytes=planned,
        predicted=solution.loss,
        baseline_logloss=measured.baseline,
        rows=rows,
        slice_name=measured.slice_name,
        chosen=chosen,
        recipe=recipe,
    )
    return plan, report


def bytes_before(spec: DLRMSpec) -> int:
    """The model's bytes as the checkpoint stores them (``plan``'s ``bytes_before``)."""
    from compress.plan import crossnet_bytes, plan_mlp
    from compress.recipe.schema import MLPSettings

    empty = Recipe("budget", "", (), MLPSettings(), None, "<budget>")
    return spec.embedding_bytes + plan_mlp(empty, spec).bytes_before + crossnet_bytes(spec)


def _finetune(chosen: tuple[Chosen, ...], given: TrainConfig | None) -> TrainConfig | None:
    """The fine-tuning settings of the chosen recipe: ``given`` (the budget recipe's), else the
    default ones when a chosen option trains, else none."""
    from compress.methods import registry

    if given is not None:
        return given
    trains = any(
        registry.for_config(c.option.config).trains(c.option.config)
        for c in chosen
        if c.option.config is not None
    )
    return default_finetune() if trains else None


def default_finetune() -> TrainConfig:
    """The ``[finetune]`` of :data:`FINETUNE_FROM`."""
    from compress.recipe.parse import load_recipe

    settings = load_recipe(FINETUNE_FROM).finetune
    assert settings is not None
    return settings


def _description(
    budget: Budget, before: int, planned: int, loss: float, rows: int, slice_name: str | None
) -> str:
    return (
        f"chosen for --budget {budget.describe(before)}: {planned:,} bytes, predicted log-loss "
        f"increase {loss:+.6f} before fine-tuning (each option measured alone on {rows:,} rows "
        f"of {slice_name})"
    )


def plan_for(
    job: LoadedModel,
    recipe: Recipe,
    data,
    valid,
    *,
    say: Callable[[str], None] | None = None,
    **read,
) -> tuple[Plan, BudgetChoice | None]:
    """The main job's plan step: ``recipe``'s plan, or for a budget recipe the plan it chooses
    and how (:func:`choose`), reading ``data`` and ``valid`` as the job will (``read``:
    ``on_bad_line``, ``dense_transform``, ``loader``). :class:`BudgetError` when a budget has no
    data to measure on."""
    from compress import pipeline

    if recipe.budget is None:
        return pipeline.plan(job, recipe), None
    if data is None and valid is None:
        raise BudgetError(
            f"{recipe.source}: a budget measures each table's options on held-out rows: give "
            "--data (its last 20% is held out) or --valid"
        )
    problem = graph_name_problem(job.spec)  # before any work, as plan() does
    if problem is not None:
        raise ModelConfigError(
            f"{job.source}: {problem}; give the features and tables distinct names"
        )
    spec = job.spec  # a budget nothing fits stops before the data is read
    check_budget(recipe.budget, spec, model_options(spec))
    train_ds, valid_ds = pipeline.load_data(job, data, valid, **read)
    slices = pipeline.validation_slices(data, valid, train_ds, valid_ds)
    return choose(
        job,
        recipe.budget,
        slices.select,
        slice_name=slices.select_name,
        train=train_ds,
        finetune=recipe.finetune,
        say=say,
    )
