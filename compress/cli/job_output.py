"""The main job's output directory: its default name, the lock and recovery of ``--out``, and
what ``--force`` may replace.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from compress.errors import ArtifactError, os_error_reason
from compress.recipe.schema import Recipe


def default_out_dir(checkpoint: Path, recipe: str | Recipe) -> Path:
    """``<checkpoint dir>/<checkpoint name>.<recipe name>`` (``--budget 3MB``: ``budget_3MB``)."""
    from compress.recipe.parse import load_recipe

    name = recipe.name if isinstance(recipe, Recipe) else load_recipe(recipe).name
    return checkpoint.parent / f"{checkpoint.name.split('.')[0]}.{name}"


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
    if any(out_dir.iterdir()):
        problem = artifact_manifest_problem(out_dir)
        if problem is not None:
            raise ArtifactError(
                f"{out_dir}: not an artifact directory ({problem}); --force replaces only "
                "artifact directories, so move it or choose another --out"
            )


def artifact_manifest_problem(out_dir: Path) -> str | None:
    """Why ``out_dir`` is not a dqrm-compress artifact directory, or ``None`` when it is: its
    ``manifest.json`` must be a JSON object whose ``format`` is this tool's format name and whose
    ``format_version`` is an integer (another program's ``manifest.json``, such as a browser
    extension's, is not enough to delete the directory)."""
    from exporters.artifacts.manifest_schema import FORMAT_NAME, MANIFEST, MAX_MANIFEST_BYTES

    path = out_dir / MANIFEST
    if path.is_symlink() or not path.is_file():
        return f"no {MANIFEST}"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        return f"{MANIFEST} unreadable: {os_error_reason(e)}"
    if len(raw) > MAX_MANIFEST_BYTES:
        return f"{MANIFEST} larger than any dqrm-compress manifest"
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return f"{MANIFEST} is not JSON"
    version = obj.get("format_version") if isinstance(obj, dict) else None
    if (
        not isinstance(obj, dict)
        or obj.get("format") != FORMAT_NAME
        or not isinstance(version, int)
        or isinstance(version, bool)
    ):
        return f"{MANIFEST} is not a {FORMAT_NAME} manifest"
    return None
