"""The main job's ``--recipe`` / ``--budget`` options and the budget's step of the job.

``--budget 3MB`` (or a recipe with ``budget = ...``) replaces a recipe: the job measures every
table's options on the held-out selection slice, chooses the recipe that fits
(:mod:`compress.budget.choose`) and then runs it as if it had been given with ``--recipe``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from compress.budget.spec import BudgetError, parse_budget
from compress.recipe.schema import MLPSettings, Recipe


def recipe_or_budget_options(f):
    """``--recipe`` (optional here) and ``--budget``: exactly one of them."""
    f = click.option(
        "--budget",
        default=None,
        metavar="SIZE",
        help="Fit the model into SIZE instead of following a recipe: bytes (3000000), KB/MB/GB "
        "(powers of 1000), KiB/MiB/GiB (powers of 1024), or NNx (the model's bytes / NN). Every "
        "table's method and bit width (and the MLP's) are chosen for the least predicted loss, "
        "measured on the validation data's selection slice; needs --data or --valid. The chosen "
        "recipe is printed and saved as recipe.toml in the artifacts.",
    )(f)
    return click.option(
        "--recipe",
        "-r",
        default=None,
        metavar="NAME|FILE.toml",
        help="A built-in recipe name (see `dqrm-compress recipes`) or a path to a recipe TOML "
        "file (one with `budget = ...` works like --budget).",
    )(f)


def job_recipe(recipe: str | None, budget: str | None, role: str) -> Recipe:
    """The recipe the main job runs: ``--recipe``'s, or a budget recipe for ``--budget``
    (:class:`click.UsageError` unless exactly one is given). A budget runs in one process
    (:class:`BudgetError` otherwise)."""
    from compress.recipe.parse import load_recipe

    if (recipe is None) == (budget is None):
        raise click.UsageError(
            "give --recipe NAME|FILE.toml or --budget SIZE"
            if recipe is None
            else "give --recipe or --budget, not both (a recipe file may hold budget = ...)"
        )
    if budget is not None:
        parsed = parse_budget(budget)
        chosen = Recipe(parsed.name, "", (), MLPSettings(), None, "--budget", parsed)
    else:
        chosen = load_recipe(recipe)
    if chosen.budget is not None and role != "single":
        raise BudgetError(
            f"{chosen.source}: a budget is chosen in one process: run it without --nproc, then "
            "run the recipe.toml it saves in the artifacts with --nproc"
        )
    return chosen


def plan_job(
    job,
    recipe: Recipe,
    data: Path | None,
    valid: Path | None,
    *,
    say: Callable[[str], None],
    **read,
):
    """``(plan, budget choice or None)``: :func:`compress.budget.choose.plan_for` (imported
    here, when the job runs: ``--help`` imports no torch)."""
    from compress.budget.choose import plan_for

    return plan_for(job, recipe, data, valid, say=say, **read)
