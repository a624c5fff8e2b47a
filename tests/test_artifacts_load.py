"""Loading and verifying artifact directories; serving them with the Predictor and the CLI.

A corrupt, incomplete or too-new directory must end as one line naming the file (exit code 2 on the
command line), never as a crash inside ONNX Runtime.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import export_small

from compress.cli.main import main
from compress.data.dataset import Dataset
from compress.data.npz import load_npz
from compress.errors import ArtifactError, DataError
from compress.io.fingerprint import sha256_file
from compress.train.evaluate import evaluate_model
from exporters.artifacts import write as artifacts
from exporters.artifacts.manifest_integrity import dump_manifest, seal
from exporters.artifacts.read import load_artifacts
from exporters.artifacts.verify import verify_artifacts
from exporters.onnx.from_model import graph_spec_from_artifacts
from exporters.onnx.parity import ParityError
from exporters.onnx.writer import OnnxExportConfig, onnx_writer
from exporters.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(job, result, artifact dir, valid .npz) of a small DLRM compressed with ``MIXED_PTQ_RECIPE``."""
    return export_small(tmp_path_factory.mktemp("exported"))


@pytest.fixture
def copy_dir(exported, tmp_path):
    """A fresh copy of the exported directory, free to corrupt."""
    out = tmp_path / "copy"
    shutil.copytree(exported[2], out)
    return out


def run(capsys, *argv):
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _torch_auc(result, valid) -> float:
    """AUC of the compressed PyTorch model on the whole file ``valid`` (``result.metrics`` are on
    its report slice only)."""
    data = load_npz(valid)
    return evaluate_model(result.model, data, result.spec.feature_names)["auc"]


def _edit_manifest(path, edit) -> None:
    """Edit the manifest and seal it again (as a writer would): only the edit is wrong."""
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(dump_manifest(seal(manifest)))


def _flip_byte(path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- loading


def test_load_maps_arrays_and_rebuilds_the_spec(exported) -> None:
    job, _, out, _ = exported
    arts = load_artifacts(out)
    assert arts.spec.tables == job.spec.tables
    assert arts.spec.model_class == job.spec.model_class
    assert arts.spec.over_arch_layer_sizes == job.spec.over_arch_layer_sizes
    table = arts.tables["t_cat_3"]
    assert table.layout == "rowwise" and table.bits == 4
    assert isinstance(table.arrays["data"], np.memmap) and not table.arrays["data"].flags.writeable
    assert set(arts.onnx["graphs"]) == {"model", "dense_arch", "over_arch"}
    assert arts.onnx["session_config"]["session.qdq_matmulnbits_accuracy_level"] == "1"
    assert verify_artifacts(out) == []


def test_verify_catches_a_flipped_byte(copy_dir) -> None:
    _flip_byte(copy_dir / "tables" / "t_cat_3.npy")
    problems = verify_artifacts(copy_dir)
    assert len(problems) == 1 and "tables/t_cat_3.npy" in problems[0] and "checksum" in problems[0]
    with pytest.raises(ArtifactError, match=r"t_cat_3\.npy: checksum mismatch"):
        load_artifacts(copy_dir)
    load_artifacts(copy_dir, verify=False)  # sizes and headers are still fine


def test_verify_catches_a_missing_file(copy_dir) -> None:
    (copy_dir / "model.onnx").unlink()
    assert verify_artifacts(copy_dir) == [f"{copy_dir / 'model.onnx'}: missing"]


def test_verify_refuses_a_newer_format(copy_dir) -> None:
    _edit_manifest(copy_dir, lambda m: m.update(format_version=99))
    (problem,) = verify_artifacts(copy_dir)
    assert "manifest.json" in problem and "newer dqrm-compress" in problem and "99" in problem


def test_verify_catches_manifest_problems(copy_dir) -> None:
    (copy_dir / "manifest.json").write_text('{"format": "dqrm-compress-artifacts", ')
    assert "broken JSON" in verify_artifacts(copy_dir)[0]
    (copy_dir / "manifest.json").unlink()
    assert verify_artifacts(copy_dir) == [
        f"{copy_dir / 'manifest.json'}: missing (not an artifact directory)"
    ]


def test_a_malformed_manifest_entry_is_a_problem_line(copy_dir) -> None:
    _edit_manifest(copy_dir, lambda m: m["dense"][0].pop("file"))
    (problem,) = verify_artifacts(copy_dir)
    assert problem == f"{copy_dir / 'manifest.json'}: dense[0].file: missing"
    with pytest.raises(ArtifactError, match=r"dense\[0\]\.file: missing"):
        load_artifacts(copy_dir)


def test_verify_catches_an_unexpected_dtype_or_shape(copy_dir) -> None:
    rel = "tables/t_cat_3.scale.npy"
    np.save(copy_dir / rel, np.zeros(7, np.float32))  # right file, wrong dtype and shape

    def refresh(manifest: dict) -> None:  # checksums updated too: only the header is wrong
        manifest["files"][rel] = {
            "sha256": sha256_file(copy_dir / rel),
            "bytes": (copy_dir / rel).stat().st_size,
        }

    _edit_manifest(copy_dir, refresh)
    problem, graph_problem = verify_artifacts(copy_dir)
    assert rel in problem and "dtype float32, expected float16" in problem
    # the full graph reads that file in place: its bytes no longer lie where it points
    assert "model.onnx: initializer 'emb.t_cat_3.scale' reads" in graph_problem


def test_unknown_layout_is_a_clear_error(copy_dir) -> None:
    _edit_manifest(copy_dir, lambda m: m["tables"][1].update(layout="hashed_v9"))
    with pytest.raises(ArtifactError, match=r"tables\[1\]\.layout: expected one of .*'hashed_v9'"):
        graph_spec_from_artifacts(copy_dir)


# ---------------------------------------------------------------- predictor


def test_predictor_scores_like_pytorch(exported) -> None:
    job, result, out, valid = exported
    predictor = Predictor(out, threads=1, batch_size=500)
    metrics = predictor.evaluate(valid)
    expected = evaluate_model(result.model, predictor.open_data(valid), job.spec.feature_names)
    assert metrics["n"] == expected["n"] == 1500
    assert metrics["auc"] == pytest.approx(expected["auc"], abs=1e-6)
    assert metrics["logloss"] == pytest.approx(expected["logloss"], abs=1e-6)
    assert np.array_equal(
        predictor.predict_raw(valid), predictor.predict(predictor.open_data(valid))
    )


def test_predict_tensors_checks_inputs(exported) -> None:
    job, result, out, _ = exported
    predictor = Predictor(out, threads=1)
    dense = np.zeros((2, 5), np.float32)
    values = {f: np.array([0, 1, 2]) for f in job.spec.feature_names}
    lengths = {f: np.array([1, 2]) for f in job.spec.feature_names}
    assert predictor.predict_tensors(dense, values, lengths).shape == (2,)
    with pytest.raises(DataError, match="row id 20 outside its table of 20 rows"):
        predictor.predict_tensors(dense, {**values, "cat_0": np.array([0, 1, 20])}, lengths)
    with pytest.raises(DataError, match="lengths sum to 2"):
        predictor.predict_tensors(dense, values, {**lengths, "cat_1": np.array([1, 1])})
    with pytest.raises(DataError, match="feature 'cat_0': row ids must be integers, got float"):
        predictor.predict_tensors(dense, {**values, "cat_0": np.array([0.0, 1.0, 2.7])}, lengths)
    part = Dataset(
        dense=dense,
        labels=np.zeros(2, np.float32),
        values={f: v for f, v in values.items() if f != "cat_1"},
        offsets={f: np.array([0, 1, 3]) for f in values if f != "cat_1"},
    )
    with pytest.raises(DataError, match="no input for sparse feature 'cat_1'"):
        predictor.predict(part)


def test_predictor_reads_raw_criteo_text(exported, tmp_path) -> None:
    job, result, out, _ = exported
    rng = np.random.default_rng(0)
    lines, raw = [], []
    for i in range(50):
        raw.append(rng.integers(0, 100, 5))
        ints = [str(int(x)) for x in raw[-1]]
        cats = [f"{int(x):08x}" for x in rng.integers(0, 2**31, 4)]
        lines.append("\t".join([str(i % 2), *ints, *cats]))
    (tmp_path / "day.tsv").write_text("\n".join(lines) + "\n")
    predictor = Predictor(out, threads=1)
    data = predictor.open_data(tmp_path / "day.tsv")
    # the manifest's transform: "none", the model was evaluated on generated (untransformed) data
    assert len(data) == 50 and np.array_equal(data.dense, np.array(raw, np.float32))
    logits = predictor.predict_raw(tmp_path / "day.tsv")
    with torch.no_grad():
        batch = data.to_batch(job.spec.feature_names)
        expected = result.model(batch.dense, batch.sparse).reshape(-1).numpy()
    assert np.abs(logits - expected).max() <= 1e-5


def test_predictor_without_graphs_builds_them_in_memory(exported, tmp_path) -> None:
    job, result, out, valid = exported
    plain = artifacts.save(result, tmp_path / "plain")  # no ONNX writer
    assert "onnx" not in plain.manifest
    assert Predictor(plain.path, threads=1).evaluate(valid) == Predictor(out, threads=1).evaluate(
        valid
    )


def test_big_tables_go_to_external_data(exported, tmp_path) -> None:
    """The table files and the float MLP tensors in ``dense/`` are read in place (but a
    table-wise table's scalar scale, a constant); other big initializers (graph constants over a
    64-byte threshold) go to ``model.onnx.data`` beside the graph."""
    _, result, _, valid = exported
    config = OnnxExportConfig(external_data_threshold_bytes=64, parity_samples=64)
    written = artifacts.save(
        result, tmp_path / "ext", extra_writers=(onnx_writer(result.model, config),)
    )
    graph = written.manifest["onnx"]["graphs"]["model"]
    tables = [f for t in written.manifest["tables"] for f in t["files"].values()]
    tables.remove("tables/t_cat_0.scale.npy")  # t_cat_0 is table-wise
    dense = [d["file"] for d in written.manifest["dense"] if "layout" not in d]
    assert graph["external_data"] == sorted([*tables, *dense, "model.onnx.data"])
    assert set(graph["external_data"]) <= set(written.manifest["files"])
    assert verify_artifacts(written.path) == []
    metrics = Predictor(written.path, threads=1).evaluate(valid)
    assert metrics["auc"] == pytest.approx(_torch_auc(result, valid), abs=1e-6)
    _flip_byte(written.path / "model.onnx.data", offset=5000)
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data: checksum mismatch"):
        Predictor(written.path)


def test_parity_failure_aborts_the_export(exported, tmp_path) -> None:
    _, result, _, _ = exported
    wrong = copy.deepcopy(result.model)
    with torch.no_grad():
        wrong.over_arch.model[1].bias += 1e-3
    with pytest.raises(ParityError, match="max abs diff"):
        artifacts.save(result, tmp_path / "out", extra_writers=(onnx_writer(wrong),))
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even the staging directory


# ---------------------------------------------------------------- command line


def test_cli_eval_on_artifacts(exported, capsys) -> None:
    job, result, out, valid = exported
    code, stdout, _ = run(capsys, "eval", out, "--data", valid, "--json")
    doc = json.loads(stdout)
    assert code == 0 and {"auc", "logloss", "accuracy", "n"} <= set(doc)
    assert doc["runtime"] == "onnxruntime" and doc["n"] == 1500
    assert doc["auc"] == pytest.approx(_torch_auc(result, valid), abs=1e-6)


def test_cli_eval_on_artifacts_refuses_a_model_config(exported, tmp_path, capsys) -> None:
    config = tmp_path / "model_config.json"
    config.write_text("{}")
    code, stdout, err = run(
        capsys, "eval", exported[2], "--data", exported[3], "--model-config", config
    )
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "--model-config applies to checkpoints" in err and "Traceback" not in err


def test_cli_verify(exported, copy_dir, capsys) -> None:
    code, stdout, _ = run(capsys, "verify", exported[2])
    n_files = len(json.loads((exported[2] / "manifest.json").read_text())["files"])
    assert code == 0 and stdout == f"ok: {n_files} files verified\n"
    _flip_byte(copy_dir / "dense" / "over_arch.model.1.bias.npy")
    code, stdout, err = run(capsys, "verify", copy_dir)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "over_arch.model.1.bias.npy: checksum mismatch" in err
    code, stdout, _ = run(capsys, "verify", copy_dir, "--json")
    assert code == 2 and json.loads(stdout)["ok"] is False


def test_cli_eval_on_corrupt_artifacts_is_one_line(exported, copy_dir, capsys) -> None:
    _flip_byte(copy_dir / "model.onnx", offset=len((copy_dir / "model.onnx").read_bytes()) // 2)
    code, stdout, err = run(capsys, "eval", copy_dir, "--data", exported[3])
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert (
        err.startswith("error: ")
        and "model.onnx: checksum mismatch" in err
        and "Traceback" not in err
    )
    shutil.copy(exported[2] / "model.onnx", copy_dir / "model.onnx")
    (copy_dir / "tables" / "t_cat_2.npy").unlink()
    code, _, err = run(capsys, "eval", copy_dir, "--data", exported[3])
    assert code == 2 and "t_cat_2.npy: missing" in err and err.count("\n") == 1
