"""What the commands share: options spelled once, JSON output, and how a checkpoint's model
config and an artifact directory are recognised.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def emit_json(obj: dict) -> None:
    """Print ``obj`` as the command's one JSON document on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


model_config_option = click.option(
    "--model-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE|NAME",
    help="A model-config JSON file, or a built-in config's name (`dqrm-compress recipes`): each "
    "table's features, the table order, shapes to check; see README.",
)


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
)


def config_or_sidecar(checkpoint: Path, model_config: Path | None) -> Path | None:
    """An explicit --model-config, else ``model_config.json`` inside a DCP directory or beside the
    checkpoint if present (:func:`compress.io.model.find_model_config`)."""
    from compress.io.model import find_model_config

    return model_config if model_config is not None else find_model_config(checkpoint)


dense_transform_option = click.option(
    "--dense-transform",
    type=click.Choice(["log3", "none"]),
    default=None,
    help="How raw Criteo text's (and raw Parquet's) dense counts become model inputs: log3 = "
    "log(max(x, -2) + 3), none = as is. Default: an artifact directory's recorded transform, else "
    "log3. Stored formats (.npz, npy days, Parquet whose --columns names one) keep their own and "
    "must agree.",
)


def data_options(f):
    """``--on-bad-line`` and ``--batch-size``: how a command reads and batches labelled data."""
    f = click.option(
        "--on-bad-line",
        type=click.Choice(["error", "skip"]),
        default="error",
        show_default=True,
        help="What to do with a malformed line of Criteo text data.",
    )(f)
    f = click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True)(f)
    return f


recipe_option = click.option(
    "--recipe",
    "-r",
    required=True,
    metavar="NAME|FILE.toml",
    help="A built-in recipe name (see `dqrm-compress recipes`) or a path to a recipe TOML file.",
)


def format_metrics(m: dict) -> str:
    """One line of AUC, log loss, accuracy and sample count."""
    return f"auc {m['auc']:.4f}   logloss {m['logloss']:.4f}   accuracy {m['accuracy']:.4f}   n {m['n']:,}"


def is_artifact_dir(path: Path) -> bool:
    """An exported artifact directory (its manifest, or at least its tables folder) rather than a
    checkpoint."""
    return path.is_dir() and ((path / "manifest.json").exists() or (path / "tables").is_dir())
