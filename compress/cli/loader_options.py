"""``--stream``, ``--loader-workers``, ``--shuffle-rows``: how the main job reads ``--data`` and
``--valid`` (:class:`compress.data.stream.LoaderSettings`); ``--columns``: which Parquet columns
hold what (:mod:`compress.data.parquet_columns`)."""

from __future__ import annotations

from pathlib import Path

import click

from compress.data.stream import (
    SHUFFLE_ROWS,
    STREAM_MIN_ROWS,
    STREAM_MODES,
    LoaderSettings,
    default_workers,
)


def loader_options(f):
    """Add the three loader options to a command (its function takes ``stream``,
    ``loader_workers`` and ``shuffle_rows``)."""
    f = click.option(
        "--shuffle-rows",
        type=click.IntRange(min=0),
        default=SHUFFLE_ROWS,
        show_default=True,
        help="Streamed training data: rows in the seeded shuffle buffer (its memory bound).",
    )(f)
    f = click.option(
        "--loader-workers",
        type=click.IntRange(min=0, max=256),
        default=None,
        help=f"Streamed data: worker processes that read and parse it (default "
        f"{default_workers()}: min(2, CPUs); 0 reads in the main process).",
    )(f)
    f = click.option(
        "--stream",
        type=click.Choice(STREAM_MODES),
        default="auto",
        show_default=True,
        help=f"Read Criteo text, npy days and Parquet as a stream (memory independent of their "
        f"size): auto when they hold more than {STREAM_MIN_ROWS:,} rows; .npz is always read "
        "whole.",
    )(f)
    return f


def loader_settings(stream: str, loader_workers: int | None, shuffle_rows: int) -> LoaderSettings:
    """The settings the three options name (defaults where not given)."""
    workers = default_workers() if loader_workers is None else loader_workers
    return LoaderSettings(stream=stream, workers=workers, shuffle_rows=shuffle_rows)  # type: ignore[arg-type]


columns_option = click.option(
    "--columns",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE.json",
    help='Parquet data: which columns hold what, a JSON object {"label": ..., "dense": [...], '
    '"sparse": {feature: column}, "dense_transform": ..., "ids": "rows"|"hash"} (every key '
    "optional; default: label, each feature's own name, the other columns as dense). See README "
    '"Data".',
)
