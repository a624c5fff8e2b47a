"""``dqrm-compress eval``: AUC, log loss and accuracy of a checkpoint, or of an artifact directory
served by ONNX Runtime, on labelled data.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from compress.cli.common import (
    config_or_sidecar,
    data_options,
    dense_transform_option,
    emit_json,
    format_metrics,
    is_artifact_dir,
    json_option,
    model_config_option,
)
from compress.cli.loader_options import columns_option
from compress.errors import ModelConfigError


@click.command(name="eval")
@click.argument("model_path", metavar="CHECKPOINT|ARTIFACTS", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Criteo TSV (.gz) file or directory, TorchRec npy day directory, Parquet file or "
    "directory (see --columns), or project .npz.",
)
@model_config_option
@data_options
@click.option(
    "--out-of-range",
    type=click.Choice(["error", "row0"]),
    default="error",
    show_default=True,
    help="Artifact directories: what to do with a row id outside its table: refuse it, or read "
    "row 0 of that table (what the ONNX graph and FBGEMM's bounds check do).",
)
@dense_transform_option
@columns_option
@json_option
def eval_cmd(
    model_path: Path,
    data_path: Path,
    model_config: Path | None,
    on_bad_line: str,
    batch_size: int,
    as_json: bool,
    out_of_range: str = "error",
    dense_transform: str | None = None,
    columns: Path | None = None,
) -> None:
    """Score a checkpoint, or an artifact directory with ONNX Runtime (after checking every
    checksum), on labelled data: AUC, log loss, accuracy."""
    if is_artifact_dir(model_path):  # ONNX Runtime: torch is not imported
        from exporters.runtime.predictor import Predictor

        if model_config is not None:
            raise ModelConfigError(
                f"{model_config}: --model-config applies to checkpoints; the artifact directory "
                f"{model_path} carries its own feature names in manifest.json"
            )
        predictor = Predictor(
            model_path,
            batch_size=batch_size,
            out_of_range=out_of_range,
            dense_transform=dense_transform,
        )
        t0 = time.perf_counter()
        data = data_path
        if columns is not None:  # Parquet with a column mapping: read here, scored by the runtime
            from compress.data.formats import open_dataset

            data = open_dataset(
                data_path,
                predictor.spec,
                dense_transform=predictor.dense_transform,
                columns=columns,
            )
        metrics = {
            **predictor.evaluate(data, on_bad_line=on_bad_line),
            "runtime": predictor.runtime,
        }
    else:
        from compress.data.stream import open_data
        from compress.io.model import load_model
        from compress.train.evaluate import evaluate_model

        loaded = load_model(model_path, config_or_sidecar(model_path, model_config))
        t0 = time.perf_counter()
        data = open_data(  # large text, npy days or Parquet stream: memory stays bounded
            data_path,
            loaded.spec,
            on_bad_line=on_bad_line,
            dense_transform=dense_transform,
            columns=columns,
        )
        metrics = evaluate_model(loaded.module, data, loaded.spec.feature_names, batch_size)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    if as_json:
        emit_json(metrics)
    else:
        click.echo(format_metrics(metrics))
