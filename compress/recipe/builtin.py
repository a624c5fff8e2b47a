"""The built-in recipes: the ``recipes/*.toml`` files shipped with the package, by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILTIN_PACKAGE = "recipes"


def builtin_dir() -> Path:
    return Path(str(resources.files(BUILTIN_PACKAGE)))


def builtin_names() -> list[str]:
    """Names of the built-in recipes (the ``recipes/*.toml`` files), sorted."""
    return sorted(
        p.name[: -len(".toml")] for p in builtin_dir().iterdir() if p.name.endswith(".toml")
    )


def builtin_path(name: str) -> Path:
    """The file of the built-in recipe ``name``."""
    return builtin_dir() / f"{name}.toml"


def builtin_recipes() -> list[tuple[str, str]]:
    """``(name, description)`` of every built-in recipe, sorted by name."""
    from compress.recipe.parse import load_recipe  # parse looks built-ins up here

    return [(name, load_recipe(name).description) for name in builtin_names()]
