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

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compress.errors import ArtifactError, os_error_reason
from compress.report_format import REPORT_DATA_FILE, REPORT_DATA_VERSION, TRAIN_LOG_FILE
from exporters.artifacts.confined_paths import confined_path
from exporters.artifacts.json_fields import show
from exporters.artifacts.manifest_integrity import decode_utf8, loads_json
from exporters.artifacts.manifest_schema import DIGEST_KEY

#: Manifest keys written after the report (left out of what it is drawn from).
SEALED_AFTER = ("files", DIGEST_KEY)
#: ``report_data.json`` or ``train_log.jsonl`` larger than this is refused before parsing (real
#: ones are kilobytes).
MAX_INPUT_BYTES = 64 << 20
#: ``train_log.jsonl`` holds one line per fine-tuning evaluation: more than this is refused.
MAX_LOG_ENTRIES = 100_000


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


def _read(path: Path) -> bytes | None:
    """The bytes of the file ``path`` (``None`` when absent), at most :data:`MAX_INPUT_BYTES`."""
    if not path.exists():
        return None
    try:
        with path.open("rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable ({os_error_reason(e)})") from None
    if len(data) > MAX_INPUT_BYTES:
        raise ArtifactError(f"{path}: more than {MAX_INPUT_BYTES >> 20} MiB, refused")
    return data


def _text(path: Path) -> str | None:
    data = _read(path)
    return None if data is None else decode_utf8(data, str(path))


def _listed_text(root: Path, name: str, files: Mapping[str, Any]) -> str | None:
    """The text of ``root/name`` (``None`` when absent), refused when it leaves the directory,
    is not listed in the manifest or differs from the sha256 listed for it (the bytes hashed are
    the bytes parsed: read once)."""
    path = confined_path(root, name)
    data = _read(path)
    if data is None:
        return None
    entry = files.get(name)
    if entry is None:
        raise ArtifactError(f"{path}: not listed in the manifest (dqrm-compress verify says more)")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ArtifactError(
            f"{path}: changed since export (its sha256 is not the manifest's); re-export it"
        )
    return decode_utf8(data, str(path))


def parse_train_log(text: str, where: Path) -> tuple[dict[str, Any], ...]:
    """The entries of ``train_log.jsonl``: objects with an integer ``step``, a number or null
    ``loss`` and an object or null ``metrics`` (numbers finite), at most :data:`MAX_LOG_ENTRIES`
    of them; :class:`ArtifactError` naming the line otherwise."""
    entries: list[dict[str, Any]] = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(entries) == MAX_LOG_ENTRIES:
            raise ArtifactError(f"{where}:{i}: more than {MAX_LOG_ENTRIES:,} entries, refused")
        entry = loads_json(line, str(where), line=i)
        problem = _log_entry_problem(entry)
        if problem is not None:
            raise ArtifactError(f"{where}:{i}: {problem}")
        entries.append(entry)
    return tuple(entries)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _log_entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "expected a JSON object"
    step, loss, metrics = entry.get("step"), entry.get("loss"), entry.get("metrics")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"step: expected a non-negative integer, got {show(step)}"
    if loss is not None and not _finite(loss):
        return f"loss: expected a finite number or null, got {show(loss)}"
    if metrics is not None and not isinstance(metrics, dict):
        return f"metrics: expected an object or null, got {show(metrics)}"
    for key in ("auc", "logloss"):
        v = (metrics or {}).get(key)
        if metrics is not None and not _finite(v):
            return f"metrics.{key}: expected a finite number, got {show(v)}"
    return None


def parse_report_data(text: str, where: Path) -> dict[str, Any]:
    """The object of ``report_data.json``; :class:`ArtifactError` when it is not JSON, not an
    object or of another version (its sections are checked where they are read,
    :mod:`exporters.report.data`)."""
    obj = loads_json(text, str(where))
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where}: expected a JSON object")
    version = obj.get("version")
    if version != REPORT_DATA_VERSION:
        raise ArtifactError(
            f"{where}: version {show(version)}, this dqrm-compress reads version "
            f"{REPORT_DATA_VERSION}"
        )
    return obj
