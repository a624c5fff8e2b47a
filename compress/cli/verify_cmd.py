"""``dqrm-compress verify``: check an artifact directory (manifest, checksums, shapes) and,
with ``--parity``, re-run the ONNX Runtime parity check on this host.
"""

from __future__ import annotations

from pathlib import Path

import click

from compress.cli.common import emit_json, json_option


@click.command()
@click.argument("artifacts_dir", metavar="ARTIFACTS", type=click.Path(path_type=Path))
@click.option(
    "--parity",
    is_flag=True,
    help="Also re-run the ONNX Runtime parity check here (this host's ORT version) on the inputs "
    "and reference logits stored at export; fails above the manifest's tolerance.",
)
@click.option(
    "--allow-format-1",
    is_flag=True,
    help="Accept a format 1 directory (its manifest has no digest of itself, so an edit to it "
    "cannot be detected) with a warning instead of refusing it; re-exporting protects it.",
)
@json_option
def verify(artifacts_dir: Path, parity: bool, allow_format_1: bool, as_json: bool) -> None:
    """Check an artifact directory: its manifest (digest, schema, paths inside the directory), the
    sha256 of every file and no file it does not list, every array's dtype and shape. Exit code 2
    and one line naming the file when it is not intact (--json lists every problem)."""
    from exporters.artifacts.read import raise_first
    from exporters.artifacts.verify import inspect_artifacts

    checked = inspect_artifacts(artifacts_dir, allow_format_1=allow_format_1)
    problems = checked.problems
    files = len(checked.manifest.files) if not problems else None
    for warning in checked.warnings:
        click.echo(f"warning: {warning}", err=True)
    report = None
    if parity and not problems:
        from exporters.onnx.parity import ParityError, parity_report

        report = parity_report(artifacts_dir)
    if as_json:
        doc = {
            "ok": not problems,
            "path": str(artifacts_dir),
            "files": files,
            "problems": problems,
            "warnings": checked.warnings,
        }
        if report is not None:
            doc.update(ok=report["ok"], parity=report)
        emit_json(doc)
    raise_first(problems)
    if report is not None and not report["ok"]:
        raise ParityError(report["problem"])
    if not as_json:
        click.echo(f"ok: {files} files verified")
        if report is not None:
            click.echo(
                f"parity: max |diff| {report['max_abs_diff']:.3g} <= {report['atol']:g} "
                f"(onnxruntime {report['runtime']}, {len(report['sets'])} sets, plain and serving "
                "sessions)"
            )
