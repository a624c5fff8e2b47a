"""``dqrm-compress demo``: build the demo model and data if missing, then run the main job on it."""

from __future__ import annotations

from pathlib import Path

import click

from compress.cli.common import json_option


@click.command()
@click.option(
    "--dir",
    "demo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo"),
    show_default=True,
    help="Where the demo checkpoint and data live.",
)
@click.option(
    "--recipe",
    "-r",
    default="int4_qat",
    show_default=True,
    metavar="NAME|FILE.toml",
    help="The recipe the main job runs on the demo.",
)
@click.option(
    "--rebuild", is_flag=True, help="Build the demo model and data again even if they exist."
)
@click.option(
    "--samples",
    type=click.IntRange(min=3000),  # training needs one batch of 2048 after the 20% holdout
    default=None,
    hidden=True,
    help="When building: a shrunken demo of this many samples, tables of at most as many rows "
    "(a smoke run; the tests use it).",
)
@json_option
def demo(
    demo_dir: Path, recipe: str, rebuild: bool, as_json: bool, samples: int | None = None
) -> None:
    """Build the demo DLRM if missing (synthetic data, ~1 min of FP32 training), then run the
    main job on it: `dqrm-compress --recipe int4_qat demo/dlrm.pt --data demo/train.npz ...`."""
    from compress.cli.main import compress_cmd  # the main job (main imports this module)
    from compress.demo import build_demo, demo_paths

    paths = demo_paths(demo_dir)
    if rebuild or not paths.complete():
        click.echo(
            f"building the demo in {demo_dir}/ (synthetic data, FP32 training) ...", err=True
        )
        report = build_demo(demo_dir, num_samples=samples)
        click.echo(
            f"demo built: valid AUC {report['valid_auc']:.4f}, Bayes AUC {report['bayes_auc']:.4f} "
            f"(the best reachable), trained in {report['train_seconds']:.0f}s",
            err=True,
        )
    out = demo_dir / f"dlrm.{Path(recipe).stem}"
    click.echo(
        f"\n$ dqrm-compress --recipe {recipe} {paths.checkpoint} --data {paths.train} "
        f"--valid {paths.valid} --out {out} --force\n",
        err=True,
    )
    click.get_current_context().invoke(
        compress_cmd,
        recipe=recipe,
        checkpoint=paths.checkpoint,
        data_path=paths.train,
        valid_path=paths.valid,
        out_dir=out,
        steps=None,
        resume=False,
        force=True,
        on_bad_line="error",
        model_config=None,
        as_json=as_json,
        max_auc_drop=None,
        keep_failed=False,
    )
