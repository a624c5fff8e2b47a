"""The main job's output directory: its default name, the lock and recovery of ``--out``, and
what ``--force`` may replace.
"""

from __future__ import annotations

from pathlib import Path

import click

from compress.errors import ArtifactError


def default_out_dir(checkpoint: Path, recipe: str) -> Path:
    """``<checkpoint dir>/<checkpoint name>.<recipe name>``."""
    from compress.recipe.parse import load_recipe

    return checkpoint.parent / f"{checkpoint.name.split('.')[0]}.{load_recipe(recipe).name}"


def hold_output(out_dir: Path, say) -> None:
    """Hold ``.<out>.lock`` until this command ends (a second run on the same ``--out`` is refused
    at its start, not after training), then tidy what a killed run on ``out`` left behind
    (:mod:`exporters.artifacts.atomic_dir`)."""
    from exporters.artifacts import atomic_dir

    lock = atomic_dir.output_lock(out_dir)
    click.get_current_context().call_on_close(lock.release)
    if atomic_dir.recover(out_dir).restored is not None:
        say(f"note: {out_dir}: put back the previous output that a killed run was replacing")


def check_replaceable(out_dir: Path, inputs: list) -> None:
    """``--force`` replaces only an artifact directory (or an empty one), never one that holds an
    input of this run: anything else at ``--out`` would be deleted with it."""
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ArtifactError(
            f"{out_dir}: not a directory; --force replaces only artifact directories"
        )
    out = out_dir.resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if src == out or out in src.parents:
            raise ArtifactError(f"{out_dir}: holds the input {item}; choose another --out")
    if any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise ArtifactError(
            f"{out_dir}: not an artifact directory (no manifest.json); --force replaces only "
            "artifact directories, so move it or choose another --out"
        )
