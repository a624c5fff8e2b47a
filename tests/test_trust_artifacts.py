"""The artifact directory is a contract: typed, confined, fully verified (issue 10, section 2).

* every path in ``manifest.json`` stays inside the directory, for ``verify``, ``eval ARTIFACTS``,
  the Predictor and the TorchRec loader;
* a malformed entry is a ``verify`` problem line naming its JSON path (exit 2), never a traceback
  and never "ok" for a directory the Predictor cannot serve;
* the manifest carries the digest of its own content: any changed byte is caught;
* the manifest records the dense transform the data really had, and raw text is read with it.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from helpers import MIXED_PTQ_RECIPE, as_format_2_layout, tiny_world

from compress import pipeline
from compress.cli.main import main
from compress.data.criteo_text import read_criteo
from compress.data.dataset import Dataset
from compress.data.npz import load_npz, save_npz
from compress.errors import ArtifactError, DataError
from compress.io.fingerprint import sha256_file
from compress.train.evaluate import evaluate_model
from exporters.artifacts import write as artifacts
from exporters.artifacts.confined_paths import confined_path
from exporters.artifacts.manifest_integrity import (
    dump_manifest,
    manifest_digest,
    read_manifest_bytes,
    seal,
)
from exporters.artifacts.manifest_schema import DIGEST_KEY, FORMAT_VERSION, MANIFEST
from exporters.artifacts.read import load_artifacts
from exporters.artifacts.verify import inspect_artifacts, verify_artifacts
from exporters.onnx.writer import OnnxExportConfig, onnx_writer
from exporters.runtime.predictor import Predictor
from exporters.runtime.torchrec_ebc import quantized_ebc_from_artifacts

ROWWISE = "t_cat_3"  # a row-wise table (the TorchRec loader reads only those)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(job, result, artifact dir with ONNX graphs, valid .npz, tmp dir)."""
    tmp = tmp_path_factory.mktemp("trust")
    ckpt, _, valid, _ = tiny_world(tmp, "DLRM", n=2000)
    (tmp / "recipe.toml").write_text(MIXED_PTQ_RECIPE)
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp / "recipe.toml"), valid=valid)
    writer = onnx_writer(result.model, OnnxExportConfig(parity_samples=16))
    written = artifacts.save(result, tmp / "out", extra_writers=(writer,))
    return job, result, written.path, valid, tmp


@pytest.fixture
def copy_dir(world, tmp_path):
    """A fresh copy of the exported directory (inside ``tmp_path/box``), free to damage."""
    out = tmp_path / "box" / "copy"
    shutil.copytree(world[2], out)
    return out


def run(capsys, *argv):
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def manifest_of(path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def write_sealed(path, manifest: dict) -> None:
    """Write ``manifest`` as the exporter would (digest recomputed): only its content is wrong."""
    (path / MANIFEST).write_text(dump_manifest(seal(manifest)))


def edit_sealed(path, edit) -> None:
    manifest = manifest_of(path)
    edit(manifest)
    write_sealed(path, manifest)


def assert_one_error_line(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


# ---------------------------------------------------------------- confinement


def _table_data_rel(manifest: dict, table: str) -> tuple[int, str]:
    i = next(i for i, t in enumerate(manifest["tables"]) if t["name"] == table)
    return i, manifest["tables"][i]["files"]["data"]


def _point_outside(copy_dir, how: str) -> str:
    """Move table ``ROWWISE``'s codes outside the directory (byte-identical, so every checksum
    still matches) and make the manifest reach them by ``how``; returns what the refusal says."""
    manifest = manifest_of(copy_dir)
    i, rel = _table_data_rel(manifest, ROWWISE)
    outside = copy_dir.parent / "outside.npy"
    shutil.move(copy_dir / rel, outside)
    if how == "symlink":  # the manifest is untouched: the file itself is a link out
        os.symlink(outside, copy_dir / rel)
        return "leaves the artifact directory through a symbolic link"
    new_rel = str(outside) if how == "absolute" else "../outside.npy"
    manifest["tables"][i]["files"]["data"] = new_rel
    manifest["files"][new_rel] = manifest["files"].pop(rel)
    write_sealed(copy_dir, manifest)
    return "absolute path refused" if how == "absolute" else "'..' refused"


HOW = ["absolute", "dotdot", "symlink"]


@pytest.mark.parametrize("how", HOW)
def test_verify_refuses_a_path_outside(copy_dir, capsys, how) -> None:
    says = _point_outside(copy_dir, how)
    problems = verify_artifacts(copy_dir)
    assert problems and any(says in p for p in problems), problems
    code, out, err = run(capsys, "verify", copy_dir)
    assert_one_error_line(code, out, err, says)
    size = (copy_dir.parent / "outside.npy").stat().st_size
    assert f"{size} bytes" not in err  # nothing about the outside file is reported


@pytest.mark.parametrize("how", HOW)
def test_predictor_and_eval_refuse_a_path_outside(world, copy_dir, capsys, how) -> None:
    says = _point_outside(copy_dir, how)
    with pytest.raises(ArtifactError, match=says.replace("'", ".")):
        Predictor(copy_dir, threads=1)
    with pytest.raises(ArtifactError, match=says.replace("'", ".")):
        load_artifacts(copy_dir, verify=False)
    code, out, err = run(capsys, "eval", copy_dir, "--data", world[3])
    assert_one_error_line(code, out, err, says)


@pytest.mark.parametrize("how", HOW)
def test_torchrec_loader_refuses_a_path_outside(world, copy_dir, how) -> None:
    quantized_ebc_from_artifacts(world[2], tables=[ROWWISE])  # the intact directory loads
    says = _point_outside(copy_dir, how)
    with pytest.raises(ArtifactError, match=says.replace("'", ".")):
        quantized_ebc_from_artifacts(copy_dir, tables=[ROWWISE])


def test_a_symlinked_folder_and_an_unlisted_file_are_refused(copy_dir, tmp_path) -> None:
    (copy_dir / "notes.txt").write_text("added later")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, copy_dir / "more")
    problems = verify_artifacts(copy_dir)
    assert f"{copy_dir / 'notes.txt'}: not listed in the manifest (added after export?)" in problems
    assert f"{copy_dir / 'more'}: a symbolic link to a directory, refused" in problems
    shutil.move(copy_dir / MANIFEST, outside / MANIFEST)
    os.symlink(outside / MANIFEST, copy_dir / MANIFEST)
    assert verify_artifacts(copy_dir) == [
        f"{copy_dir / MANIFEST}: a symbolic link, refused (the manifest must be a file)"
    ]


def test_confined_path_rules(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.npy").write_bytes(b"")
    os.symlink(tmp_path / "a" / "x.npy", tmp_path / "a" / "inside.npy")
    assert confined_path(tmp_path, "a/x.npy") == tmp_path / "a" / "x.npy"
    assert confined_path(tmp_path, "a/inside.npy") == tmp_path / "a" / "inside.npy"
    for rel, says in [
        ("/etc/passwd", "absolute path refused"),
        ("a/../../x", "'..' refused"),
        ("a//x.npy", "not in normal form"),
        ("./a/x.npy", "not in normal form"),
        ("a\\x.npy", "backslash"),
        ("", "expected a relative path"),
        (3, "expected a relative path"),
        (MANIFEST, "cannot list itself"),
    ]:
        with pytest.raises(ArtifactError, match=says.replace("'", ".")):
            confined_path(tmp_path, rel)


def test_an_onnx_graph_reading_external_data_elsewhere_is_refused(copy_dir, tmp_path) -> None:
    """ONNX Runtime takes an external-data location from the graph itself: it must be a file the
    manifest lists for it (here: a graph rewritten to read ``../stolen.bin``, checksums updated)."""
    import onnx

    path = copy_dir / "over_arch.onnx"
    model = onnx.load(str(path))
    tensor = next(t for t in model.graph.initializer if t.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../stolen.bin")
    onnx.save(model, str(path))

    def refresh(manifest: dict) -> None:
        manifest["files"]["over_arch.onnx"] = {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
        }

    edit_sealed(copy_dir, refresh)
    problems = verify_artifacts(copy_dir)
    listed = json.loads((copy_dir / MANIFEST).read_text())["onnx"]["graphs"]["over_arch"]
    assert listed["external_data"] and all(f.startswith("dense/") for f in listed["external_data"])
    assert problems == [
        f"{path}: reads external data from '../stolen.bin'; the manifest lists "
        + ", ".join(map(repr, listed["external_data"]))
    ]


# ---------------------------------------------------------------- schema


def _features_entry(m: dict) -> dict:
    return m["inputs"]["sparse"]


MALFORMED = {
    "string row count": (
        lambda m: m["tables"][3].update(num_embeddings="5000"),
        "tables[3].num_embeddings: expected a positive integer, got '5000'",
    ),
    "string model row count": (
        lambda m: m["model"]["tables"][1].update(num_embeddings="300"),
        "model.tables[1].num_embeddings: expected a positive integer, got '300'",
    ),
    "a missing feature entry": (
        lambda m: _features_entry(m).pop("cat_2"),
        "inputs.sparse: no entry for feature 'cat_2'",
    ),
    "empty tables": (
        lambda m: m.update(tables=[]),
        "tables: no entry for table 't_cat_0' of the model",
    ),
    "a feature listed twice": (
        lambda m: m["model"]["tables"][1].update(feature_names=["cat_1", "cat_0"]),
        "feature 'cat_0' served by more than one table",
    ),
    "a shape of strings": (
        lambda m: m["dense"][0].update(shape=[16, "5"]),
        "dense[0].shape[1]: expected a non-negative integer, got '5'",
    ),
    "a boolean for an integer": (
        lambda m: m["tables"][0].update(bits=True),
        "tables[0].bits: expected a positive integer or null, got True",
    ),
    "a missing table file role": (
        lambda m: m["tables"][2]["files"].pop("bias"),
        "tables[2].files: roles ['data', 'scale'], expected ['bias', 'data', 'scale']",
    ),
    "table shape differs from the model": (
        lambda m: m["tables"][1].update(embedding_dim=4),
        "tables[1].embedding_dim: 4, the model section says 8",
    ),
    "a file with no checksum entry": (
        lambda m: m["files"].pop("tables/t_cat_1.npy"),
        "files: 'tables/t_cat_1.npy' is used by the manifest but has no checksum entry",
    ),
    "a malformed checksum": (
        lambda m: m["files"]["tables/t_cat_1.npy"].update(sha256="xyz"),
        "expected a sha256 hex digest, got 'xyz'",
    ),
    "a graph input missing for a feature": (
        lambda m: m["onnx"]["graphs"]["model"]["features"].pop("cat_1"),
        "onnx.graphs.model.features: features ['cat_0', 'cat_2', 'cat_3']",
    ),
    "an unknown dense transform": (
        lambda m: m["inputs"]["dense"]["transform"].update(name="sqrt"),
        "inputs.dense.transform.name: expected one of 'log3', 'none', 'unknown', got 'sqrt'",
    ),
    "a transform with another formula": (
        lambda m: m["inputs"]["dense"]["transform"].update(formula="log(x + 1)"),
        "inputs.dense.transform.formula: 'log(x + 1)', transform 'none' is 'x'",
    ),
    "a section of the wrong kind": (
        lambda m: m.update(dense={"key": "x"}),
        "dense: expected a list, got",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_entry_is_a_problem_line(world, copy_dir, capsys, case) -> None:
    edit, says = MALFORMED[case]
    edit_sealed(copy_dir, edit)
    code, out, err = run(capsys, "verify", copy_dir)
    assert_one_error_line(code, out, err, f"{copy_dir / MANIFEST}: ", says)
    with pytest.raises(ArtifactError, match="manifest.json: "):
        Predictor(copy_dir, threads=1)
    code, out, err = run(capsys, "eval", copy_dir, "--data", world[3])
    assert_one_error_line(code, out, err, says)


def test_verify_lists_every_schema_problem(copy_dir, capsys) -> None:
    def edit(m: dict) -> None:
        m["tables"][3]["num_embeddings"] = "5000"
        m["dense"][1]["bytes"] = -1
        del m["inputs"]["sparse"]["cat_0"]

    edit_sealed(copy_dir, edit)
    code, out, _ = run(capsys, "verify", copy_dir, "--json")
    doc = json.loads(out)
    assert code == 2 and doc["ok"] is False and len(doc["problems"]) == 3
    paths = [p.split(": ")[1] for p in doc["problems"]]
    assert paths == ["inputs.sparse", "tables[3].num_embeddings", "dense[1].bytes"]


def test_verify_says_ok_only_for_a_servable_directory(copy_dir, capsys) -> None:
    """A dense weight the architecture needs, dropped from the manifest and the directory: every
    entry is well-formed and every file checks out, but no model can be assembled."""
    key = "over_arch.model.1.bias"

    def drop(m: dict) -> None:
        entry = next(d for d in m["dense"] if d["key"] == key)
        m["dense"].remove(entry)
        del m["files"][entry["file"]]
        (copy_dir / entry["file"]).unlink()
        # the graphs read it in place (a file they read must be listed): a directory without them
        for graph in m.pop("onnx")["graphs"].values():
            del m["files"][graph["file"]]
            (copy_dir / graph["file"]).unlink()

    edit_sealed(copy_dir, drop)
    code, out, err = run(capsys, "verify", copy_dir)
    assert_one_error_line(code, out, err, f"no dense weight {key!r}")


# ---------------------------------------------------------------- digest


def test_the_manifest_records_the_digest_of_its_content(world) -> None:
    manifest = manifest_of(world[2])
    assert manifest["format_version"] == FORMAT_VERSION == 3 and list(manifest)[-1] == DIGEST_KEY
    assert manifest[DIGEST_KEY] == manifest_digest(manifest)
    assert (world[2] / MANIFEST).read_text() == dump_manifest(manifest)


def _small_manifest_bytes(world, tmp_path) -> bytes:
    """A manifest without ONNX graphs (a few KiB): every byte of it is flipped below."""
    written = artifacts.save(world[1], tmp_path / "plain")
    return (written.path / MANIFEST).read_bytes()


def test_every_single_byte_change_is_caught(world, tmp_path) -> None:
    """Every byte of a manifest flipped in one bit (the bit varies with the position), plus 3000
    more random single-bit flips: each one is refused, never a traceback and never accepted."""
    data = _small_manifest_bytes(world, tmp_path)
    read_manifest_bytes(data)  # the intact one reads
    rng = np.random.default_rng(1234)
    flips = [(i, i % 8) for i in range(len(data))]
    flips += [
        (int(i), int(b))
        for i, b in zip(rng.integers(0, len(data), 3000), rng.integers(0, 8, 3000), strict=True)
    ]
    for i, bit in flips:
        damaged = bytearray(data)
        damaged[i] ^= 1 << bit
        with pytest.raises(ArtifactError):
            read_manifest_bytes(bytes(damaged))


def test_changes_that_parse_to_the_same_values_are_caught(world, tmp_path) -> None:
    data = _small_manifest_bytes(world, tmp_path)
    text = data.decode()
    same_values = [
        text.replace("\n", "\r\n"),  # line endings
        text.replace('": ', '":  ', 1),  # one more space
        json.dumps(json.loads(text), indent=4) + "\n",  # reformatted
        text.replace('"format": "dqrm', '"format": "\\u0064qrm', 1),  # an escape for 'd'
    ]
    for variant in same_values:
        assert json.loads(variant) == json.loads(text)
        with pytest.raises(ArtifactError, match="not byte for byte as dqrm-compress wrote it"):
            read_manifest_bytes(variant.encode())


def test_swapping_two_features_entries_is_caught(copy_dir, capsys) -> None:
    """The edit an unprotected manifest took silently (the graph then reads cat_1's ids as cat_0's):
    the text is rewritten in its exact format, only the digest is not recomputed."""
    manifest = manifest_of(copy_dir)
    features = manifest["onnx"]["graphs"]["model"]["features"]
    features["cat_0"], features["cat_1"] = features["cat_1"], features["cat_0"]
    (copy_dir / MANIFEST).write_text(dump_manifest(manifest))
    code, out, err = run(capsys, "verify", copy_dir)
    assert_one_error_line(code, out, err, f"content does not match its {DIGEST_KEY}")
    with pytest.raises(ArtifactError, match="does not match its manifest_sha256"):
        Predictor(copy_dir, threads=1)


def test_a_format_2_manifest_without_digest_is_refused(copy_dir) -> None:
    manifest = manifest_of(copy_dir)
    del manifest[DIGEST_KEY]
    (copy_dir / MANIFEST).write_text(dump_manifest(manifest))
    (problem,) = verify_artifacts(copy_dir)
    assert f"{DIGEST_KEY} missing or not a sha256 hex digest" in problem


def test_broken_manifest_bytes_are_one_problem_line(copy_dir, capsys) -> None:
    for data in (b"\xff\xfe{}", b'{"a": 1, "a": 2}', b"[" * 100_000, b"[]"):
        (copy_dir / MANIFEST).write_bytes(data)
        code, out, err = run(capsys, "verify", copy_dir)
        assert_one_error_line(code, out, err, str(copy_dir / MANIFEST))


def _as_format_1(manifest: dict, root=None) -> dict:
    """The manifest as dqrm-compress wrote format 1: no digest, the transform a bare name, none of
    what format 2 added (parity reference data under ``onnx/parity/``, deleted from ``root``,
    the out-of-range note, the selection and report slices)."""
    manifest = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    manifest["format_version"] = 1
    manifest["inputs"]["dense"]["transform"] = "log3"
    onnx = manifest.get("onnx") or {}
    onnx.pop("out_of_range_ids", None)
    onnx.pop("out_of_range_ids_note", None)
    (onnx.get("parity") or {}).pop("reference_data", None)
    for key in ("select", "report"):
        manifest["source"]["data"].pop(key, None)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if "/parity/" not in k}
    if root is not None:
        shutil.rmtree(root / "onnx" / "parity", ignore_errors=True)
    return manifest


def test_a_format_1_directory_is_read_with_a_warning(world, copy_dir, capsys, tmp_path) -> None:
    as_format_2_layout(copy_dir)  # the graph and its copy of the tables where format 1 kept them
    (copy_dir / MANIFEST).write_text(dump_manifest(_as_format_1(manifest_of(copy_dir), copy_dir)))
    checked = inspect_artifacts(copy_dir, allow_format_1=True)
    assert checked.ok and len(checked.warnings) == 1 and "re-export" in checked.warnings[0]
    code, out, err = run(capsys, "verify", copy_dir, "--allow-format-1")
    assert code == 0 and out.startswith("ok: ") and err.startswith("warning: ")
    assert "has no digest of itself" in err
    # its transform is not known ("log3" was written whatever the data was): raw text needs one
    text = tmp_path / "day.tsv"
    text.write_text("1\t1\t2\t3\t4\t5\ta\tb\tc\td\n0\t0\t0\t0\t0\t0\t1\t2\t3\t4\n")
    code, out, err = run(capsys, "eval", copy_dir, "--data", text)
    warning, error = err.splitlines(keepends=True)  # reading it warns (a log record), then fails
    assert warning.startswith("warning: ") and "format_version 1" in warning
    assert_one_error_line(
        code, out, error, "format 1 manifests do not record it", "--dense-transform"
    )
    code, out, _ = run(
        capsys, "eval", copy_dir, "--data", text, "--dense-transform", "none", "--json"
    )
    assert code == 0 and json.loads(out)["n"] == 2
    # the npz is read as stored and scores as before
    assert Predictor(copy_dir, threads=1).evaluate(world[3]) == Predictor(
        world[2], threads=1
    ).evaluate(world[3])


# ---------------------------------------------------------------- dense transform


def _criteo_text(path, n: int = 40, seed: int = 0) -> np.ndarray:
    """``n`` Criteo lines for the tiny model (5 dense, 4 categorical); returns the raw dense."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(-1, 60, (n, 5))
    lines = [
        "\t".join(
            [str(i % 2), *map(str, raw[i]), *(f"{int(x):x}" for x in rng.integers(0, 2**31, 4))]
        )
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return raw


def test_an_npz_export_records_the_npz_transform(world, tmp_path) -> None:
    job, result, out, valid, _ = world
    assert result.dense_transform == "none"  # generated data: no transform made its dense values
    assert manifest_of(out)["inputs"]["dense"]["transform"] == {"name": "none", "formula": "x"}
    logged = load_npz(valid)
    logged.dense_transform = "log3"
    save_npz(logged, tmp_path / "log3.npz")
    assert load_npz(tmp_path / "log3.npz").dense_transform == "log3"
    again = pipeline.compress(job, result.plan, valid=tmp_path / "log3.npz")
    written = artifacts.save(again, tmp_path / "out")
    assert written.manifest["inputs"]["dense"]["transform"] == {
        "name": "log3",
        "formula": "log(max(x, -2) + 3)",
    }


def test_raw_text_eval_applies_the_manifest_transform(world, tmp_path, capsys) -> None:
    job, result, out, valid, _ = world
    raw = _criteo_text(tmp_path / "day.tsv")
    predictor = Predictor(out, threads=1)
    data = predictor.open_data(tmp_path / "day.tsv")
    assert data.dense_transform == "none" and np.array_equal(data.dense, raw.astype(np.float32))
    # an export whose data was log3 text reads raw text with log3
    logged = pipeline.compress(job, result.plan, valid=tmp_path / "day.tsv")
    assert logged.dense_transform == "log3"
    log_dir = artifacts.save(logged, tmp_path / "log3").path
    log_data = Predictor(log_dir, threads=1).open_data(tmp_path / "day.tsv")
    expected = np.log(np.maximum(raw, -2) + 3.0).astype(np.float32)
    assert np.array_equal(log_data.dense, expected)
    text = read_criteo(
        tmp_path / "day.tsv",
        num_dense=5,
        num_sparse=4,
        feature_names=job.spec.feature_names,
        num_embeddings=[t.num_embeddings for t in job.spec.tables],
        dense_transform="log3",
    ).dataset
    expected_metrics = evaluate_model(logged.model, text, job.spec.feature_names)
    code, stdout, _ = run(capsys, "eval", log_dir, "--data", tmp_path / "day.tsv", "--json")
    assert code == 0
    assert json.loads(stdout)["logloss"] == pytest.approx(expected_metrics["logloss"], abs=1e-6)


def test_dense_transform_option_reads_text_and_is_recorded(world, tmp_path, capsys) -> None:
    job, result, out, valid, tmp = world
    raw = _criteo_text(tmp_path / "day.tsv")
    plain = pipeline.compress(job, result.plan, valid=tmp_path / "day.tsv", dense_transform="none")
    assert plain.dense_transform == "none"
    # --dense-transform may repeat the manifest's transform; another one is refused (it would
    # feed the model inputs it was not trained on)
    p = Predictor(out, threads=1, dense_transform="none")
    assert np.array_equal(p.open_data(tmp_path / "day.tsv").dense, raw.astype(np.float32))
    with pytest.raises(DataError, match="takes 'none'-transformed .* not 'log3'"):
        Predictor(out, threads=1, dense_transform="log3")
    code, stdout, _ = run(
        capsys, "eval", out, "--data", tmp_path / "day.tsv", "--dense-transform", "none", "--json"
    )
    assert code == 0 and json.loads(stdout)["n"] == 40
    code, stdout, err = run(capsys, "eval", out, "--data", valid, "--dense-transform", "log3")
    assert_one_error_line(code, stdout, err, "takes 'none'-transformed", "not 'log3'")
    ckpt = tmp / "model.pt"
    code, stdout, err = run(capsys, "eval", ckpt, "--data", valid, "--dense-transform", "log3")
    assert_one_error_line(code, stdout, err, "stored 'none'-transformed")


def test_data_with_two_transforms_is_refused(world, tmp_path) -> None:
    job, result, _, valid, tmp = world
    _criteo_text(tmp_path / "day.tsv")
    with pytest.raises(DataError, match="'log3'-transformed but .* holds 'none'-transformed"):
        pipeline.compress(job, result.plan, data=valid, valid=tmp_path / "day.tsv")


def test_a_dataset_in_another_transform_is_refused_by_the_predictor(world) -> None:
    _, _, out, valid, _ = world
    data = load_npz(valid)
    data.dense_transform = "log3"
    with pytest.raises(DataError, match="'log3'-transformed, the model takes 'none'"):
        Predictor(out, threads=1).evaluate(data)


def test_an_export_without_data_records_an_unknown_transform(world, tmp_path, capsys) -> None:
    job, result, _, _, _ = world
    blind = pipeline.compress(job, result.plan)  # PTQ, no data read at all
    assert blind.dense_transform is None
    out = artifacts.save(blind, tmp_path / "blind").path
    assert manifest_of(out)["inputs"]["dense"]["transform"] == {"name": "unknown", "formula": None}
    _criteo_text(tmp_path / "day.tsv")
    code, stdout, err = run(capsys, "eval", out, "--data", tmp_path / "day.tsv")
    assert_one_error_line(
        code, stdout, err, "no data was read when it was compressed", "--dense-transform"
    )
    code, stdout, _ = run(
        capsys, "eval", out, "--data", tmp_path / "day.tsv", "--dense-transform", "log3", "--json"
    )
    assert code == 0 and json.loads(stdout)["n"] == 40


def test_datasets_carry_their_transform(tmp_path) -> None:
    from compress.data.criteo_npy import read_npy_days
    from compress.data.dataset import concat_datasets

    data = Dataset(
        dense=np.zeros((3, 1), np.float32),
        labels=np.array([0, 1, 0], np.float32),
        values={"f": np.array([0, 1, 2])},
        offsets={"f": np.array([0, 1, 2, 3])},
        dense_transform="log3",
    )
    derived = [data.take([2, 0]), data.slice(0, 2), data.select_features(["f"])]
    derived += [*data.split_tail(1 / 3), concat_datasets([data, data])]
    assert {d.dense_transform for d in derived} == {"log3"}
    with pytest.raises(ValueError, match="differ in their dense transform"):
        concat_datasets([data, Dataset(data.dense, data.labels, data.values, data.offsets)])
    with pytest.raises(ValueError, match="dense_transform must be one of"):
        Dataset(data.dense, data.labels, data.values, data.offsets, dense_transform="sqrt")
    np.save(tmp_path / "day_0_dense.npy", np.zeros((2, 1), np.float32))
    np.save(tmp_path / "day_0_sparse.npy", np.zeros((2, 1), np.int64))
    np.save(tmp_path / "day_0_labels.npy", np.zeros((2, 1), np.int64))
    days = read_npy_days(tmp_path, feature_names=["f"], num_embeddings=[3])
    assert days.dense_transform == "log3"  # TorchRec's preprocessing of Criteo
