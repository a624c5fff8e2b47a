"""``dqrm-compress inspect``: what is in a checkpoint (model class, tables, MLP layers, bytes),
and a model-config template to edit.
"""

from __future__ import annotations

from pathlib import Path

import click

from compress.cli.common import config_or_sidecar, emit_json, json_option, model_config_option
from compress.io.summary import checkpoint_summary, format_bytes


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@model_config_option
@click.option(
    "--write-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a model-config template (tables in order, their features and shapes) to this "
    "new file; edit it, then put it beside the checkpoint or pass it with --model-config.",
)
@json_option
def inspect(
    checkpoint: Path, model_config: Path | None, write_config: Path | None, as_json: bool
) -> None:
    """Show a checkpoint's model class, tables, MLP layers and sizes (reads shapes only)."""
    from compress.io.model import read_spec, read_spec_for_template, write_model_config

    config = config_or_sidecar(checkpoint, model_config)
    if write_config is None:
        ckpt, spec = read_spec(checkpoint, config)
    else:
        ckpt, spec, problem = read_spec_for_template(checkpoint, config)
        write_model_config(write_config, spec)
        fix = f"; edit it before use: {problem}" if problem else ""
        click.echo(f"wrote model config {write_config}{fix}", err=True)
    summary = checkpoint_summary(ckpt, spec)
    if as_json:
        emit_json(summary)
        return
    click.echo(f"{summary['checkpoint']}  ({summary['format']})")
    click.echo(f"model: {summary['model']}  interaction: {summary['interaction']}")
    click.echo(
        f"dense features: {spec.dense_in_features}   sparse features: {spec.num_sparse_features}"
    )
    click.echo(
        f"bottom MLP: {spec.dense_in_features}-" + "-".join(map(str, spec.dense_arch_layer_sizes))
    )
    click.echo("top MLP:    " + "-".join(map(str, spec.over_arch_layer_sizes)))
    rows = [
        (
            t["name"],
            ",".join(t["feature_names"]),
            t["num_embeddings"],
            t["embedding_dim"],
            t["bytes"],
        )
        for t in summary["tables"]
    ]
    w = max(len(r[0]) for r in rows)
    fw = max(8, max(len(r[1]) for r in rows))
    click.echo(f"\n{'table':<{w}}  {'features':<{fw}}  {'rows':>12}  {'dim':>4}  {'bytes':>12}")
    for name, feats, n, d, b in rows:
        click.echo(f"{name:<{w}}  {feats:<{fw}}  {n:>12,}  {d:>4}  {format_bytes(b):>12}")
    click.echo(
        f"\nembedding: {format_bytes(summary['embedding_bytes'])}   dense: "
        f"{format_bytes(summary['dense_bytes'])}   total: {format_bytes(summary['total_bytes'])}"
    )
