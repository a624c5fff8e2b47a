"""``manifest.json`` as bytes: one spelling, a digest of itself, and the checked read.

* **Digest.** ``manifest_sha256`` is the sha256 of the canonical JSON
  (:func:`compress.io.fingerprint.canonical_json`: sorted keys, compact separators, ASCII) of
  every other key; :func:`seal` adds it. It is checked before anything else is read, and the file
  must be byte for byte what :func:`dump_manifest` writes for its content, so one changed byte
  anywhere is caught, including changes that parse to the same values (``1e-05`` -> ``1E-05``).
  The digest detects accidents and edits, not forgery: whoever can write the directory can
  recompute it (sign the directory to prove its origin).
* **Format 1.** Format 1 directories (no digest) are still read, with a warning that a changed
  value in their manifest cannot be detected (:func:`format_1_warning`): their arrays are
  checksummed as before and every other check applies, and refusing them would strand models that
  took hours to fine-tune; re-exporting protects them (``verify`` refuses them unless told
  ``--allow-format-1``). A format 1 manifest holding anything only format 2 writes
  (:func:`format_2_content`: a digest, a transform object, parity reference data, ...) is a format
  2 manifest stripped of its protection and is refused.
* **Reading.** :func:`read_manifest_bytes` checks, in order: JSON (:func:`decode_manifest`),
  format and version, digest and byte form (:func:`check_integrity`), schema
  (:func:`exporters.artifacts.manifest_parse.parse_manifest`); it also returns the warning of
  artifacts that failed their quality gate (:func:`quality_gate_warnings`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compress.errors import ArtifactError, first_line
from compress.io.fingerprint import sha256_json
from exporters.artifacts.json_fields import SHA256
from exporters.artifacts.manifest_parse import check_header, parse_manifest
from exporters.artifacts.manifest_schema import (
    DIGEST_KEY,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    PARITY_DIR,
    Manifest,
)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``manifest`` without its digest key."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return sha256_json(body)


def seal(manifest: dict) -> dict:
    """Record ``manifest``'s digest in it (as its last key, replacing an older one); returns it."""
    manifest.pop(DIGEST_KEY, None)
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    return manifest


def dump_manifest(manifest: Mapping[str, Any]) -> str:
    """The text of ``manifest.json`` for ``manifest``: the only spelling a reader accepts."""
    return json.dumps(manifest, indent=2, sort_keys=False) + "\n"


def decode_manifest(data: bytes, where: str) -> dict:
    """The JSON object in the bytes of a ``manifest.json``; :class:`ArtifactError` for anything
    that is not one (bad UTF-8, broken JSON, a key given twice, nesting too deep, an integer
    too long to convert)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{where}: {len(data)} bytes, more than a manifest can hold")
    obj = loads_json(decode_utf8(data, where), where)
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where}: not a dqrm-compress manifest (not a JSON object)")
    return obj


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text; :class:`ArtifactError` naming ``where`` and the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{where}: not UTF-8 text (byte {e.start})") from None


def loads_json(text: str, where: str, line: int | None = None) -> Any:
    """The JSON value of ``text`` (line ``line`` of ``where`` when given, as in a JSON Lines
    file); :class:`ArtifactError` for broken JSON, a key given twice, nesting too deep or an
    integer longer than Python converts (``sys.get_int_max_str_digits``)."""
    at = where if line is None else f"{where}:{line}"
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        lineno = f":{e.lineno}" if line is None else ""
        raise ArtifactError(f"{at}{lineno}: broken JSON: {e.msg}") from None
    except _DuplicateKey as e:
        raise ArtifactError(f"{at}: broken JSON: key {e.args[0]!r} given twice") from None
    except RecursionError:
        raise ArtifactError(f"{at}: broken JSON: nested too deeply") from None
    except ValueError as e:  # int(): more digits than sys.get_int_max_str_digits()
        raise ArtifactError(f"{at}: broken JSON: {first_line(e)}") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def format_2_content(obj: Mapping[str, Any]) -> list[str]:
    """The JSON paths of what only format 2 writes (format 1 never did) found in ``obj``."""

    def at(*keys: str) -> Any:
        node: Any = obj
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        return node

    found = [DIGEST_KEY] if DIGEST_KEY in obj else []
    if isinstance(at("inputs", "dense", "transform"), Mapping):
        found.append("inputs.dense.transform (an object)")
    for *parent, key in (
        ("onnx", "out_of_range_ids"),
        ("onnx", "parity", "reference_data"),
        ("source", "data", "select"),
        ("source", "data", "report"),
    ):
        node = at(*parent)
        if isinstance(node, Mapping) and key in node:
            found.append(".".join((*parent, key)))
    files = obj.get("files")
    if isinstance(files, Mapping) and any(str(f).startswith(PARITY_DIR + "/") for f in files):
        found.append(f"files under {PARITY_DIR}/")
    return found


def format_1_warning(where: str) -> str:
    """What reading a format 1 manifest warns (and ``verify`` refuses unless allowed)."""
    return (
        f"{where}: format_version 1 manifest has no digest of itself, so a changed value in it "
        "cannot be detected (its files are still checksummed); re-export it with this version to "
        "protect it: dqrm-compress --recipe RECIPE CHECKPOINT --out DIR --force (the manifest's "
        "recipe.toml holds the recipe it was made with)"
    )


def check_integrity(obj: Mapping[str, Any], data: bytes, version: int, where: str) -> list[str]:
    """Check a manifest's digest and byte form (raise :class:`ArtifactError`); returns warnings
    (a format 1 manifest without a digest). A format 1 manifest holding format 2 content is
    refused (a downgrade that would hide a missing or stale digest)."""
    recorded = obj.get(DIGEST_KEY)
    newer = format_2_content(obj) if version < 2 else []
    if newer:
        raise ArtifactError(
            f"{where}: format_version {version} manifest holds {', '.join(newer)}, which only "
            "format 2 writes (a format 2 manifest relabelled to skip its digest check?): refused; "
            "re-export it or restore it from a copy"
        )
    if recorded is None and version < 2:
        warnings = [format_1_warning(where)]
    elif not SHA256.test(recorded):
        raise ArtifactError(
            f"{where}: {DIGEST_KEY} missing or not a sha256 hex digest (format_version {version} "
            "manifests record the digest of their content): damaged or edited after export"
        )
    elif recorded != manifest_digest(obj):
        raise ArtifactError(
            f"{where}: content does not match its {DIGEST_KEY} (changed or corrupted after "
            "export): re-export it, or restore it from a copy"
        )
    else:
        warnings = []
    if dump_manifest(obj).encode("utf-8") != data:
        raise ArtifactError(
            f"{where}: not byte for byte as dqrm-compress wrote it (reformatted, edited or "
            "corrupted after export): re-export it, or restore it from a copy"
        )
    return warnings


def read_manifest_bytes(data: bytes, where: str | Path = MANIFEST) -> tuple[Manifest, list[str]]:
    """The :class:`Manifest` in the bytes of a ``manifest.json`` and the warnings reading it gave,
    checked in order: JSON, format and version, digest and byte form, schema. Raises
    :class:`ArtifactError` (:class:`ManifestError` for schema problems, listing them all)."""
    where = str(where)
    obj = decode_manifest(data, where)
    version = check_header(obj, where)
    warnings = check_integrity(obj, data, version, where)
    manifest = parse_manifest(obj, where)
    return manifest, warnings + quality_gate_warnings(manifest, where)


def quality_gate_warnings(manifest: Manifest, where: str) -> list[str]:
    """One line when the artifacts failed the quality gate they were made under (kept with
    ``--keep-failed``), else none."""
    gate = manifest.quality_gate
    if gate is None or gate.passed:
        return []
    why = f": {gate.failure}" if gate.failure else ""
    return [
        f"{where}: these artifacts FAILED their quality gate (--max-auc-drop "
        f"{gate.max_auc_drop:g}){why}; they were kept with --keep-failed"
    ]
