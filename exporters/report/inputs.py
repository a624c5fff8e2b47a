"""What a report is drawn from: the manifest, ``train_log.jsonl`` and ``report_data.json``.

:func:`read_directory` reads a finished artifact directory (the ``report`` command): the manifest
through :func:`exporters.artifacts.read.load_manifest` (digest and schema checked), and the two
optional files through :func:`~exporters.artifacts.confined_paths.confined_path`, each checked
against the sha256 the manifest lists for it. :func:`stage_inputs` reads a directory being
exported, whose manifest is not sealed yet (the main job's report).

Either way the manifest's ``files`` and ``manifest_sha256`` are left out: they are written after
the report (whose own checksum is in ``files``), so the report of a directory is the same bytes
whether drawn at export or later. Older artifacts lack ``report_data.json`` (and PTQ runs
``train_log.jsonl``): those inputs are ``None`` and the report says what is not recorded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compress.errors import ArtifactError
from compress.io.fingerprint import sha256_file
from compress.report_format import REPORT_DATA_FILE, REPORT_DATA_VERSION, TRAIN_LOG_FILE
from exporters.artifacts.confined_paths import confined_path
from exporters.artifacts.manifest_schema import DIGEST_KEY

#: Manifest keys written after the report (left out of what it is drawn from).
SEALED_AFTER = ("files", DIGEST_KEY)


@dataclass(frozen=True)
class ReportInputs:
    """The manifest (without :data:`SEALED_AFTER`), the fine-tuning log (``None``: no
    ``train_log.jsonl``), ``report_data.json`` (``None``: not recorded) and the warnings reading
    the manifest gave (a format-1 manifest, a failed quality gate)."""

    manifest: Mapping[str, Any]
    train_log: tuple[Mapping[str, Any], ...] | None
    report_data: Mapping[str, Any] | None
    warnings: tuple[str, ...] = ()


def read_directory(root: str | Path) -> ReportInputs:
    """The inputs of the artifact directory ``root``; :class:`ArtifactError` (one line) when it
    is not one, its manifest fails its checks, or a file the report reads was changed."""
    from exporters.artifacts.read import load_manifest

    root = Path(root)
    read = load_manifest(root)
    files = read.manifest.files
    texts = {name: _listed_text(root, name, files) for name in (TRAIN_LOG_FILE, REPORT_DATA_FILE)}
    return replace(_inputs(root, dict(read.manifest.raw), texts), warnings=read.warnings)


def stage_inputs(stage: Path, manifest: Mapping[str, Any]) -> ReportInputs:
    """The inputs of a directory being exported (``manifest`` not sealed yet)."""
    texts = {name: _text(stage / name) for name in (TRAIN_LOG_FILE, REPORT_DATA_FILE)}
    return _inputs(stage, json.loads(json.dumps(manifest)), texts)


def _inputs(root: Path, manifest: dict, texts: Mapping[str, str | None]) -> ReportInputs:
    manifest = {k: v for k, v in manifest.items() if k not in SEALED_AFTER}
    log, data = texts[TRAIN_LOG_FILE], texts[REPORT_DATA_FILE]
    return ReportInputs(
        manifest=manifest,
        train_log=None if log is None else parse_train_log(log, root / TRAIN_LOG_FILE),
        report_data=None if data is None else parse_report_data(data, root / REPORT_DATA_FILE),
    )


def _text(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from None


def _listed_text(root: Path, name: str, files: Mapping[str, Any]) -> str | None:
    """The text of ``root/name`` (``None`` when absent), refused when it leaves the directory,
    is not listed in the manifest or differs from the sha256 listed for it."""
    path = confined_path(root, name)
    if not path.exists():
        return None
    entry = files.get(name)
    if entry is None:
        raise ArtifactError(f"{path}: not listed in the manifest (dqrm-compress verify says more)")
    if sha256_file(path) != entry.sha256:
        raise ArtifactError(
            f"{path}: changed since export (its sha256 is not the manifest's); re-export it"
        )
    return _text(path)


def parse_train_log(text: str, where: Path) -> tuple[dict[str, Any], ...]:
    """The entries of ``train_log.jsonl``: objects with an integer ``step``, a number or null
    ``loss`` and an object or null ``metrics``; :class:`ArtifactError` naming the line otherwise."""
    entries = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{where}:{i}: not JSON ({e.msg})") from None
        problem = _log_entry_problem(entry)
        if problem is not None:
            raise ArtifactError(f"{where}:{i}: {problem}")
        entries.append(entry)
    return tuple(entries)


def _log_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "expected a JSON object"
    step, loss, metrics = entry.get("step"), entry.get("loss"), entry.get("metrics")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"step: expected a non-negative integer, got {step!r}"
    if loss is not None and (not isinstance(loss, (int, float)) or isinstance(loss, bool)):
        return f"loss: expected a number or null, got {loss!r}"
    if metrics is not None and not isinstance(metrics, dict):
        return f"metrics: expected an object or null, got {metrics!r}"
    for key in ("auc", "logloss"):
        v = (metrics or {}).get(key)
        if metrics is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            return f"metrics.{key}: expected a number, got {v!r}"
    return None


def parse_report_data(text: str, where: Path) -> dict[str, Any]:
    """The object of ``report_data.json``; :class:`ArtifactError` when it is not JSON, not an
    object or of another version (its sections are checked where they are read,
    :mod:`exporters.report.data`)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{where}: not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where}: expected a JSON object")
    version = obj.get("version")
    if version != REPORT_DATA_VERSION:
        raise ArtifactError(
            f"{where}: version {version!r}, this dqrm-compress reads version {REPORT_DATA_VERSION}"
        )
    return obj
