"""``dqrm-compress report ARTIFACTS [--out report.html]``: the artifact directory as one HTML page.

The page is self-contained (inline CSS and SVG plots, no script, no network): plan and bytes per
table, quality, fine-tuning curves, reconstruction error, ROC and calibration, ONNX Runtime parity,
provenance (:mod:`exporters.report`). It needs matplotlib, the ``report`` extra; without it the
command says so in one line and exits with code 2. Nothing heavy is imported before the command
runs, so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from compress.cli.common import emit_json, json_option


@click.command(name="report")
@click.argument("artifacts_dir", metavar="ARTIFACTS", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("report.html"),
    show_default=True,
    help="The HTML file to write (outside ARTIFACTS, whose own report.html the main job wrote).",
)
@json_option
def report(artifacts_dir: Path, out_path: Path, as_json: bool) -> None:
    """Write a self-contained HTML report of an artifact directory: plan and bytes per table,
    AUC/log loss, fine-tuning curves, reconstruction error, ROC and calibration, parity and
    provenance. What older artifacts do not hold is listed as not recorded."""
    from exporters.report.render import write_report_file

    written = write_report_file(artifacts_dir, out_path)
    for warning in written.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        emit_json(
            {
                "out": str(written.path),
                "plots": list(written.plots),
                "missing": list(written.missing),
                "warnings": list(written.warnings),
            }
        )
        return
    click.echo(f"wrote {written.path} ({len(written.plots)} plots)")
    for item in written.missing:
        click.echo(f"not recorded: {item}", err=True)
