"""No silent wrong answers at serving time.

* An id outside ``[0, rows)`` never reads another table's row: every lookup graph (every table
  layout, stacked or not, one-hot or pooled) reads row 0 of the id's own table, as FBGEMM's bounds
  check does, and the :class:`~exporters.runtime.predictor.Predictor` refuses such ids unless asked to
  serve them like the graph.
* Malformed jagged inputs (ids that do not match the lengths, negative lengths) are errors.
* Exported graphs are exact in a plain ``onnxruntime.InferenceSession(path)``, with no session
  option (INT4 MLPs included), and ``verify --parity`` re-proves it on the serving host against
  reference logits stored in the artifacts.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import export_small, tiny_world
from onnx import TensorProto
from test_onnx_lookup import (
    CASES,
    _build_sparse_arch,
    _pool_reference,
    _sparse_arch_features,
    make_table,
    reference_rows,
)

from compress import pipeline
from compress.cli.main import main
from compress.data.dataset import Dataset
from compress.data.npz import save_npz
from compress.errors import DataError, DqrmError
from exporters.artifacts import write as artifacts
from exporters.artifacts.manifest_integrity import dump_manifest, seal
from exporters.onnx.lookup import OUT_OF_RANGE_IDS, build_gather_model, build_pool_model
from exporters.onnx.parity import ParityError, ort_session, run_session
from exporters.onnx.spec import GraphBuilder
from exporters.onnx.writer import OnnxExportConfig, onnx_writer, sample_multihot
from exporters.runtime.predictor import OutOfRangeIdError, Predictor, dataset_feeds

ROWS = 40


def _bad_ids(rows: int) -> np.ndarray:
    """Valid ids mixed with every kind of bad one: -1, very negative, ``rows`` (the next table's
    first row in a stacked layout), just past it, and past int32."""
    return np.array([3, -1, rows, rows - 1, -(2**40), rows + 1, 0, 2**33, 7], np.int64)


def _row0_ids(ids: np.ndarray, rows: int) -> np.ndarray:
    return np.where((ids >= 0) & (ids < rows), ids, 0)


# ---------------------------------------------------------------- lookup graphs


@pytest.mark.parametrize(("kind_name", "bits"), CASES)
def test_out_of_range_ids_read_row0_of_their_own_table(kind_name: str, bits: int | None) -> None:
    table = make_table(kind_name, bits, 16, rows=ROWS)
    ids = _bad_ids(ROWS)
    expected = reference_rows(table, _row0_ids(ids, ROWS))
    impls = ("gbq", "standard") if kind_name == "rowwise" else ("auto",)
    for impl in impls:
        session = ort_session(build_gather_model(table, impl), threads=1)
        got = run_session(session, {"ids": ids})["rows"]
        np.testing.assert_array_equal(got, expected, err_msg=f"{kind_name}/{bits}/{impl}")
        pooled = run_session(
            ort_session(build_pool_model(table, impl), threads=1),
            {"values": ids, "lengths": np.array([2, 0, 7], np.int64)},
        )["pooled"]
        ref = _pool_reference(expected, np.array([2, 0, 7]))
        np.testing.assert_allclose(pooled, ref, atol=1e-5)


@pytest.mark.parametrize("hinted", [False, True])
@pytest.mark.parametrize("bags", ["one_hot", "multi_hot"])
def test_stacked_tables_never_serve_a_neighbours_row(hinted: bool, bags: str) -> None:
    """Features of stacked row-wise tables (one initializer for all tables of a bit width): an id
    equal to its table's row count is row 0 of that table, not the next table's first row."""
    tables = _sparse_arch_features()
    hint = (True, False, True, True, False, False) if hinted else None
    session = ort_session(_build_sparse_arch(tables, one_hot=hint), threads=1)
    batch = 4
    rng = np.random.default_rng(0)
    feeds, expected = {}, []
    for i, table in enumerate(tables):
        n = table.num_rows
        lengths = np.ones(batch, np.int64) if bags == "one_hot" else rng.integers(1, 4, batch)
        ids = rng.integers(0, n, int(lengths.sum()))
        ids[: min(4, len(ids))] = [n, -1, n + 3, 2**35][: min(4, len(ids))]
        feeds[f"f{i}__values"], feeds[f"f{i}__lengths"] = ids.astype(np.int64), lengths
        expected.append(_pool_reference(reference_rows(table, _row0_ids(ids, n)), lengths))
    got = run_session(session, feeds)["pooled"]
    np.testing.assert_allclose(got, np.stack(expected, axis=1), atol=1e-5)


def test_id_guard_is_cheap() -> None:
    """Every feature pays a ``Cast``, a ``Less`` and a ``Where`` on its ids only (row-wise groups
    too: their tables are read as stored, with no copy of row 0 to clip onto)."""
    from exporters.onnx.lookup import add_valid_ids

    gb = GraphBuilder("guard")
    ids = gb.add_input("ids", TensorProto.INT64, ["n"])
    add_valid_ids(gb, ids, 10)
    assert [n.op_type for n in gb.nodes] == ["Cast", "Less", "Where"]
    model = _build_sparse_arch(_sparse_arch_features())  # five stacked features, one fp32
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Clip") == 0 and ops.count("Less") == 6


# ---------------------------------------------------------------- exported artifacts

INT4_RECIPE = """
name = "int4_mix"
[[tables]]
match = ["t_cat_0"]
method = "ptq"
bits = 4
granularity = "table"
[[tables]]
match = ["t_cat_1"]
method = "fp16"
[[tables]]
match = ["t_cat_2"]
method = "keep"
[[tables]]
match = ["*"]
method = "ptq"
bits = 4
granularity = "row"
[mlp]
method = "ptq"
bits = 4
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(job, result, artifact dir, valid .npz): INT4 tables of both granularities, fp16 and fp32
    tables, and INT4 MLPs (the layers ORT used to rewrite into int8-activation kernels)."""
    return export_small(tmp_path_factory.mktemp("trust_serving"), INT4_RECIPE)


def _torch_logits(model: torch.nn.Module, data: Dataset, spec) -> np.ndarray:
    with torch.no_grad():
        batch = data.to_batch(spec.feature_names)
        return model(batch.dense, batch.sparse).reshape(-1).numpy()


def _feeds(out, data: Dataset) -> dict[str, np.ndarray]:
    graph = json.loads((out / "manifest.json").read_text())["onnx"]["graphs"]["model"]
    inputs = {f: (io["values"], io["lengths"]) for f, io in graph["features"].items()}
    return dataset_feeds(data, inputs)


def test_plain_session_is_exact_with_int4_mlps(exported) -> None:
    """No session options at all: ORT's default optimizations must not change the logits."""
    job, result, out, _ = exported
    data = sample_multihot(job.spec, 2000, seed=11)
    expected = _torch_logits(result.model, data, job.spec)
    for name in ("model", "dense_arch"):
        graphs = json.loads((out / "manifest.json").read_text())["onnx"]["graphs"]
        path = out / graphs[name]["file"]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        if name == "model":
            got = session.run(["logits"], _feeds(out, data))[0].reshape(-1)
            assert np.abs(got - expected).max() <= 1e-5
        else:
            with torch.no_grad():
                ref = result.model.dense_arch(torch.from_numpy(data.dense)).numpy()
            got = session.run(None, {"dense": data.dense})[0]
            assert np.abs(got - ref).max() <= 1e-5


def _bad_ids_case(spec, n: int, seed: int) -> tuple[Dataset, dict, dict]:
    """``(reference, ids, lengths)``: multi-hot samples whose ids (per feature) are 30% out of
    range, and the same samples with those ids mapped to 0 (what PyTorch, which refuses them,
    scores as the reference)."""
    data = sample_multihot(spec, n, seed)
    rng = np.random.default_rng(seed)
    ids, ref = {}, {}
    for f in spec.feature_names:
        v = data.values[f]
        rows = spec.table_of_feature(f).num_embeddings
        pick = rng.random(len(v)) < 0.3
        ids[f] = v.copy()
        ids[f][pick] = rng.choice(np.array([-1, rows, rows + 1, -(2**40), 2**40]), pick.sum())
        ref[f] = np.where(pick, 0, v)
    reference = Dataset(dense=data.dense, labels=data.labels, values=ref, offsets=data.offsets)
    return reference, ids, {f: data.lengths(f) for f in spec.feature_names}


def test_exported_graph_serves_out_of_range_ids_as_row0(exported) -> None:
    """Every layout of the full model (stacked INT4 rows, table-wise, fp16, fp32) against the
    PyTorch model fed the same ids with the bad ones mapped to 0 first."""
    job, result, out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnx"]["out_of_range_ids"] == OUT_OF_RANGE_IDS == "row0_of_own_table"
    assert manifest["onnx"]["parity"]["samples"]["out_of_range"] == 256
    reference, ids, lengths = _bad_ids_case(job.spec, 300, seed=3)
    expected = _torch_logits(result.model, reference, job.spec)
    feeds = _feeds(out, reference)
    for f, v in ids.items():
        feeds[f"{f}__values"] = v
    session = ort.InferenceSession(str(out / "model.onnx"))
    got = session.run(["logits"], feeds)[0].reshape(-1)
    assert np.abs(got - expected).max() <= 1e-5
    # and the Predictor, when told to serve them like the graph
    predictor = Predictor(out, threads=1, out_of_range="row0")
    served = predictor.predict_tensors(reference.dense, ids, lengths)
    assert np.abs(served - expected).max() <= 1e-5


def test_shared_tables_serve_out_of_range_ids_as_row0(tmp_path) -> None:
    """ROBE-Z tables hash any integer; the graph must hash row 0 for an id out of range."""
    ckpt, _, valid, _ = tiny_world(tmp_path, "DLRM", n=3000)
    (tmp_path / "r.toml").write_text(
        'name = "s"\n[[tables]]\nmatch = ["t_cat_2", "t_cat_3"]\nmethod = "share"\n'
        'compression = 10.0\nblock_size = 4\ngroup = "g"\n[finetune]\nsteps = 2\n'
        "batch_size = 64\neval_every = 0\n"
    )
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp_path / "r.toml"), valid=valid)
    config = OnnxExportConfig(parity_samples=32)
    out = artifacts.save(
        result, tmp_path / "out", extra_writers=(onnx_writer(result.model, config),)
    ).path
    reference, ids, lengths = _bad_ids_case(job.spec, 100, seed=4)
    expected = _torch_logits(result.model, reference, job.spec)
    session = ort.InferenceSession(str(out / "model.onnx"))
    feeds = _feeds(out, reference)
    for f, v in ids.items():
        feeds[f"{f}__values"] = v
    got = session.run(["logits"], feeds)[0].reshape(-1)
    assert np.abs(got - expected).max() <= 1e-5


# ---------------------------------------------------------------- Predictor input checks


def _one_batch(spec) -> tuple[np.ndarray, dict, dict]:
    dense = np.zeros((2, 5), np.float32)
    values = {f: np.array([0, 1, 2]) for f in spec.feature_names}
    lengths = {f: np.array([1, 2]) for f in spec.feature_names}
    return dense, values, lengths


@pytest.mark.parametrize("bad", [-1, 20, 21, -(2**40)])
def test_predictor_refuses_out_of_range_ids_by_default(exported, bad: int) -> None:
    job, _, out, _ = exported
    predictor = Predictor(out, threads=1)
    dense, values, lengths = _one_batch(job.spec)
    with pytest.raises(OutOfRangeIdError) as info:
        predictor.predict_tensors(dense, {**values, "cat_0": np.array([0, bad, 2])}, lengths)
    message = str(info.value)
    assert isinstance(info.value, DataError) and "\n" not in message
    assert f"feature 'cat_0': row id {bad} outside its table of 20 rows" in message
    assert "out_of_range='row0'" in message


def test_predictor_row0_option_serves_like_the_graph(exported) -> None:
    job, result, out, _ = exported
    dense, values, lengths = _one_batch(job.spec)
    bad = {**values, "cat_0": np.array([0, 20, -3]), "cat_3": np.array([5000, 4, -1])}
    got = Predictor(out, threads=1, out_of_range="row0").predict_tensors(dense, bad, lengths)
    mapped = {**values, "cat_0": np.array([0, 0, 0]), "cat_3": np.array([0, 4, 0])}
    expected = Predictor(out, threads=1).predict_tensors(dense, mapped, lengths)
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="out_of_range must be 'error' or 'row0'"):
        Predictor(out, out_of_range="clip")


def test_predictor_refuses_malformed_bags(exported) -> None:
    job, _, out, _ = exported
    predictor = Predictor(out, threads=1, out_of_range="row0")  # no option makes these valid
    dense, values, lengths = _one_batch(job.spec)
    with pytest.raises(DataError, match="feature 'cat_1': 3 ids but lengths sum to 4"):
        predictor.predict_tensors(dense, values, {**lengths, "cat_1": np.array([2, 2])})
    with pytest.raises(DataError, match="feature 'cat_2': negative bag length -1"):
        predictor.predict_tensors(dense, values, {**lengths, "cat_2": np.array([4, -1])})
    with pytest.raises(DataError, match=r"feature 'cat_0': ids must be \[n\]"):
        predictor.predict_tensors(dense, {**values, "cat_0": np.array([[0, 1, 2]])}, lengths)
    # lengths of 2^62 overflow an int64 sum: still refused, before ONNX Runtime
    wrap = {**values, "cat_1": np.array([], dtype=np.int64)}
    with pytest.raises(DataError, match="feature 'cat_1': a bag of 4611686018427387904 ids"):
        predictor.predict_tensors(dense, wrap, {**lengths, "cat_1": np.array([2**62, 2**62])})
    with pytest.raises(DataError, match="feature 'cat_1': bag lengths must be integers"):
        predictor.predict_tensors(dense, values, {**lengths, "cat_1": np.array([1.5, 1.5])})


def run_cli(capsys, *argv):
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _labelled(data: Dataset, values: dict | None = None) -> Dataset:
    return Dataset(
        dense=data.dense,
        labels=(np.arange(len(data)) % 2).astype(np.float32),
        values=values or data.values,
        offsets=data.offsets,
    )


def test_cli_eval_out_of_range_flag(exported, tmp_path, capsys) -> None:
    """A data file with ids beyond their tables (.npz can hold them): refused by default, with
    the flag that serves them named; served as row 0 with ``--out-of-range row0``."""
    job, _, out, _ = exported
    data = _labelled(sample_multihot(job.spec, 50, seed=2))
    bad = {**data.values, "cat_2": data.values["cat_2"] + 2000}  # table of 2000 rows
    save_npz(_labelled(data, bad), tmp_path / "bad.npz")
    code, stdout, err = run_cli(capsys, "eval", out, "--data", tmp_path / "bad.npz")
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "feature 'cat_2': row id" in err and "--out-of-range row0" in err
    code, stdout, _ = run_cli(
        capsys, "eval", out, "--data", tmp_path / "bad.npz", "--out-of-range", "row0", "--json"
    )
    assert code == 0 and json.loads(stdout)["n"] == 50
    zeros = _labelled(data, {**data.values, "cat_2": np.zeros_like(data.values["cat_2"])})
    save_npz(zeros, tmp_path / "zeros.npz")
    _, same, _ = run_cli(capsys, "eval", out, "--data", tmp_path / "zeros.npz", "--json")
    assert json.loads(same)["auc"] == json.loads(stdout)["auc"]


# ---------------------------------------------------------------- verify --parity


def test_parity_reference_is_stored_as_plain_npy(exported) -> None:
    _, _, out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    stored = manifest["onnx"]["parity"]["reference_data"]
    assert set(stored) == {"one_hot", "multi_hot", "out_of_range"}
    for entry in stored.values():
        for rel in [*entry["inputs"].values(), entry["logits"]]:
            assert rel.startswith("onnx/parity/") and rel.endswith(".npy")
            assert rel in manifest["files"]
            np.load(out / rel, allow_pickle=False)  # no pickle needed to read any of them
    assert manifest["onnx"]["parity"]["atol"] == 1e-5
    assert set(manifest["onnx"]["parity"]["sessions"]) == {"plain", "serving"}


def _copy(exported, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(exported[2], dst)
    return dst


def _rewrite_logits(path, set_name: str, delta: float) -> None:
    """Change a stored reference (and its checksum, as a consistent but wrong export would)."""
    manifest = json.loads((path / "manifest.json").read_text())
    rel = manifest["onnx"]["parity"]["reference_data"][set_name]["logits"]
    logits = np.load(path / rel)
    logits[3] += delta
    np.save(path / rel, logits, allow_pickle=False)
    data = (path / rel).read_bytes()
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(dump_manifest(seal(manifest)))


def test_cli_verify_parity(exported, tmp_path, capsys) -> None:
    out = exported[2]
    code, stdout, _ = run_cli(capsys, "verify", out, "--parity")
    assert (
        code == 0 and "parity: max |diff|" in stdout and f"onnxruntime {ort.__version__}" in stdout
    )
    code, stdout, _ = run_cli(capsys, "verify", out, "--parity", "--json")
    doc = json.loads(stdout)
    assert code == 0 and doc["ok"] is True
    assert doc["parity"]["ok"] is True and doc["parity"]["max_abs_diff"] <= 1e-5
    assert doc["parity"]["atol"] == 1e-5 and doc["parity"]["runtime"] == ort.__version__
    code, stdout, _ = run_cli(capsys, "verify", out, "--json")  # without --parity: no key
    assert code == 0 and "parity" not in json.loads(stdout)

    bad = _copy(exported, tmp_path)
    _rewrite_logits(bad, "multi_hot", 1e-3)
    code, stdout, err = run_cli(capsys, "verify", bad)  # checksums alone cannot see it
    assert code == 0
    code, stdout, err = run_cli(capsys, "verify", bad, "--parity")
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "parity" in err and "multi_hot" in err and "> atol 1e-05" in err
    code, stdout, err = run_cli(capsys, "verify", bad, "--parity", "--json")
    doc = json.loads(stdout)
    assert code == 2 and doc["ok"] is False and doc["parity"]["ok"] is False
    assert doc["parity"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)


def test_verify_parity_without_stored_reference_is_one_line(exported, tmp_path, capsys) -> None:
    from exporters.onnx.parity import verify_parity

    plain = artifacts.save(exported[1], tmp_path / "plain")  # exported without graphs
    with pytest.raises(DqrmError, match="no ONNX parity reference"):
        verify_parity(plain.path)
    code, _, err = run_cli(capsys, "verify", plain.path, "--parity")
    assert code == 2 and err.count("\n") == 1 and "no ONNX parity reference" in err


def test_verify_parity_raises_parity_error(exported, tmp_path) -> None:
    from exporters.onnx.parity import verify_parity

    bad = _copy(exported, tmp_path)
    _rewrite_logits(bad, "one_hot", -2e-4)
    with pytest.raises(ParityError, match="one_hot"):
        verify_parity(bad)


@pytest.mark.slow
def test_reexport_is_byte_identical_with_parity_data(exported, tmp_path) -> None:
    _, result, out, _ = exported
    again = artifacts.save(
        result, tmp_path / "again", extra_writers=(onnx_writer(result.model),)
    ).path
    first = json.loads((out / "manifest.json").read_text())["files"]
    second = json.loads((again / "manifest.json").read_text())["files"]
    assert first == second and any(rel.startswith("onnx/parity/") for rel in first)


def test_manifest_schema_checks_parity_paths(exported, tmp_path, capsys) -> None:
    """The stored parity files are part of the manifest's contract: a path leaving the
    directory is refused like any other, naming its key."""
    bad = _copy(exported, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["onnx"]["parity"]["reference_data"]["one_hot"]["logits"] = "../logits.npy"
    (bad / "manifest.json").write_text(dump_manifest(seal(manifest)))
    code, _, err = run_cli(capsys, "verify", bad, "--parity")
    assert code == 2 and "onnx.parity.reference_data.one_hot.logits" in err
