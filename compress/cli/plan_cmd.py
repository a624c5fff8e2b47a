"""``dqrm-compress recipes`` and ``plan``: the built-in recipes and model configs, and what a
recipe does to each table of a checkpoint, or of a model config alone, with exact bytes (no data
read; from a config, nothing allocated: shapes only).
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
    """List the built-in recipes, and the built-in model configs (`plan --model-config NAME`)."""
    from compress.io.model_config import builtin_models
    from compress.recipe.builtin import builtin_recipes

    items = builtin_recipes()
    models = builtin_models()
    if as_json:
        emit_json(
            {
                "recipes": [{"name": n, "description": d} for n, d in items],
                "models": [{"name": n, "description": d} for n, d in models],
            }
        )
        return
    _echo_names(items)
    if models:
        click.echo("\nmodel configs (--model-config NAME):")
        _echo_names(models)


def _echo_names(items: list[tuple[str, str]]) -> None:
    """``name  description`` lines, names padded to one width."""
    width = max(len(n) for n, _ in items)
    for name, description in items:
        click.echo(f"{name:<{width}}  {description}")


def _plan_epilog() -> str:
    from compress.io.model_config import builtin_model_names

    names = builtin_model_names()
    return f"Built-in model configs: {', '.join(names)}." if names else ""


@click.command(epilog=_plan_epilog())
@recipe_option
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@model_config_option
@json_option
def plan(recipe: str, checkpoint: Path | None, model_config: Path | None, as_json: bool) -> None:
    """Show what a recipe does to each table, with exact bytes before/after (reads no data).

    Without CHECKPOINT, --model-config (a file or a built-in name) describes the whole model and
    nothing is allocated: a 100 GB model plans in seconds.
    """
    from compress import pipeline
    from compress.plan import format_plan

    if checkpoint is None:
        if model_config is None:
            raise click.UsageError(
                "give a CHECKPOINT, or --model-config FILE|NAME to plan a model from its config"
            )
        from compress.io.model_config import read_config_spec

        model = read_config_spec(model_config)
    else:
        model = pipeline.load(checkpoint, config_or_sidecar(checkpoint, model_config))
    the_plan = pipeline.plan(model, recipe)
    if as_json:
        emit_json(the_plan.to_json())
    else:
        click.echo(format_plan(the_plan))
