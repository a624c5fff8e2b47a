"""Write a :class:`~compress.recipe.schema.Recipe` back as TOML that reads back into an equal one.

Every setting is written out, defaults included, so the file documents what will run (the
manifest records it as ``recipe.toml``); ``[mlp] activations`` only when it is ``"int8"``, so
a recipe without it writes what it always wrote. A rule's method writes its own keys
(:meth:`~compress.methods.registry.TableMethod.recipe_items`).
"""

from __future__ import annotations

import math
from typing import Any

from compress.recipe.reader import toml_str
from compress.recipe.schema import FINETUNE_KEYS, MLPSettings, Recipe


def recipe_to_toml(recipe: Recipe) -> str:
    """The recipe as TOML that :func:`~compress.recipe.parse.parse_recipe` reads back into an
    equal :class:`Recipe`."""
    lines = [
        f"name = {_toml_value(recipe.name)}",
        f"description = {_toml_value(recipe.description)}",
    ]
    if recipe.budget is not None:
        lines.append(f"budget = {_toml_value(recipe.budget.text)}")
    for rule in recipe.rules:
        lines += ["", "[[tables]]", f"match = {_toml_value(list(rule.match))}"]
        bounds = [("min_rows", rule.min_rows), ("max_rows", rule.max_rows)]
        items = bounds + rule.table_method.recipe_items(rule.config)
        lines += [f"{key} = {_toml_value(value)}" for key, value in items if value is not None]
    if recipe.mlp != MLPSettings():
        lines += ["", "[mlp]", f"method = {_toml_value(recipe.mlp.method)}"]
        if recipe.mlp.bits is not None:
            lines += [
                f"bits = {recipe.mlp.bits}",
                f"per_channel = {_toml_value(recipe.mlp.per_channel)}",
            ]
        if recipe.mlp.activations != MLPSettings().activations:
            lines.append(f"activations = {_toml_value(recipe.mlp.activations)}")
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
        return toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a recipe")
