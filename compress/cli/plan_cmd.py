"""``dqrm-compress recipes`` and ``plan``: the built-in recipes, and what a recipe does to each
table of a checkpoint, with exact bytes (no data read).
"""

from __future__ import annotations

from pathlib import Path

import click

from compress.cli.common import (
    config_or_sidecar,
    emit_json,
    json_option,
    model_config_option,
    recipe_option,
)


@click.command()
@json_option
def recipes(as_json: bool) -> None:
    """List the built-in recipes."""
    from compress.recipe.builtin import builtin_recipes

    items = builtin_recipes()
    if as_json:
        emit_json({"recipes": [{"name": n, "description": d} for n, d in items]})
        return
    width = max(len(n) for n, _ in items)
    for name, description in items:
        click.echo(f"{name:<{width}}  {description}")


@click.command()
@recipe_option
@click.argument("checkpoint", type=click.Path(path_type=Path))
@model_config_option
@json_option
def plan(recipe: str, checkpoint: Path, model_config: Path | None, as_json: bool) -> None:
    """Show what a recipe does to each table, with exact bytes before/after (reads no data)."""
    from compress import pipeline
    from compress.plan import format_plan

    job = pipeline.load(checkpoint, config_or_sidecar(checkpoint, model_config))
    the_plan = pipeline.plan(job, recipe)
    if as_json:
        emit_json(the_plan.to_json())
    else:
        click.echo(format_plan(the_plan))
