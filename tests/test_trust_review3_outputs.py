"""Third review of outputs and served graphs: ``--force`` replaces only a directory whose
``manifest.json`` is a dqrm-compress manifest, a recipe ``name`` cannot lead the default output
elsewhere, a graph ONNX Runtime cannot load is one line, external data is found anywhere in a graph
(sparse ``Constant`` values, model-local functions, subgraphs), a full disk while taking the output
lock is one line, features whose ONNX input names collide are refused before any work, a
``--dense-transform`` that contradicts the manifest is refused, and a model config's empty
``tables`` list is refused."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from helpers import tiny_world
from onnx import TensorProto, helper

from compress import pipeline
from compress.cli.main import main
from compress.errors import ArtifactError, DataError, ModelConfigError
from compress.io.model_config import load_model_config
from compress.io.model_spec import GRAPH_IO_NAMES, sanitize_name
from exporters.artifacts import atomic_dir
from exporters.artifacts.manifest_integrity import dump_manifest, seal
from exporters.artifacts.manifest_schema import DIGEST_KEY, MANIFEST
from exporters.artifacts.verify import inspect_artifacts
from exporters.onnx import model as onnx_model
from exporters.onnx import spec as onnx_spec
from exporters.onnx.parity import make_session
from exporters.runtime.predictor import Predictor


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A small int8 artifact directory compressed with .npz data (transform ``none``), and the
    validation set."""
    tmp = tmp_path_factory.mktemp("review3")
    ckpt, train, valid, _ = tiny_world(tmp, n=800)
    out = tmp / "art"
    rc = main(["--no-progress", "-r", "int8_ptq", str(ckpt), "--data", str(train)]
              + ["--valid", str(valid), "--out", str(out)])  # fmt: skip
    assert rc == 0
    return out, valid


def _resealed_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of the artifact directory ``src`` whose full graph ``edit(model)`` changed, the
    manifest re-sealed over the new checksum (what an attacker with write access can do)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    rel = manifest["onnx"]["graphs"]["model"]["file"]
    path = dst / rel
    model = onnx.load(str(path), load_external_data=False)
    edit(model, manifest)
    onnx.save(model, str(path))
    manifest["files"][rel] = {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bytes": path.stat().st_size,
    }
    manifest.pop(DIGEST_KEY, None)
    (dst / MANIFEST).write_text(dump_manifest(seal(manifest)))
    return dst


# --------------------------------------------------------------------------------------------
# 1. --force and another program's manifest.json


def test_force_keeps_a_directory_whose_manifest_json_is_not_ours(tmp_path, capsys):
    ckpt = tiny_world(tmp_path, n=200)[0]
    out = tmp_path / "extension"
    (out / "src").mkdir(parents=True)
    (out / "manifest.json").write_text('{"manifest_version": 3, "name": "my extension"}')
    (out / "src" / "background.js").write_text("chrome.runtime;")
    code, _, err = run(capsys, "-r", "int8_ptq", ckpt, "--out", out, "--force")
    line = one_error_line(code, err)
    assert f"{out}: not an artifact directory" in line
    assert "not a dqrm-compress-artifacts manifest" in line
    assert (out / "src" / "background.js").read_text() == "chrome.runtime;"
    (out / "manifest.json").write_text("not json")
    code, _, err = run(capsys, "-r", "int8_ptq", ckpt, "--out", out, "--force")
    assert "manifest.json is not JSON" in one_error_line(code, err)
    assert (out / "src" / "background.js").is_file()


# --------------------------------------------------------------------------------------------
# 2. a recipe name that is a path


@pytest.mark.parametrize("name", ["int8_ptq/../../escaped_by_recipe", "..", ".hidden", "a b"])
def test_recipe_name_must_be_a_plain_file_name(tmp_path, capsys, name):
    (tmp_path / "w").mkdir()
    ckpt = tiny_world(tmp_path / "w", n=200)[0]
    recipe = tmp_path / "evil.toml"
    recipe.write_text(f'name = "{name}"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 8\n')
    code, _, err = run(capsys, "-r", recipe, ckpt)
    line = one_error_line(code, err)
    assert line.startswith(f"error: {recipe}: name must be letters, digits")
    assert not (tmp_path / "escaped_by_recipe").exists()
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [
        "model.pt",
        "train.npz",
        "valid.npz",
    ]


# --------------------------------------------------------------------------------------------
# 3. a graph this ONNX Runtime cannot load; external data anywhere in a graph


def _opset_99(model, manifest) -> None:
    model.opset_import[0].version = 99
    manifest["onnx"]["graphs"]["model"]["opset_imports"]["ai.onnx"] = 99


def test_a_graph_onnx_runtime_cannot_load_is_one_line(exported, tmp_path, capsys):
    out, valid = exported
    bad = _resealed_copy(out, tmp_path / "ir99", _opset_99)
    graph = bad / json.loads((bad / MANIFEST).read_text())["onnx"]["graphs"]["model"]["file"]
    want = f"{graph}: ONNX Runtime {ort.__version__} cannot load this graph: "
    for argv in (["verify", "--parity", bad], ["eval", bad, "--data", valid]):
        line = one_error_line(*run(capsys, *argv)[::2])
        assert line.startswith(f"error: {want}") and "Opset 99" in line, line
    with pytest.raises(ArtifactError, match="cannot load this graph"):
        Predictor(bad, threads=1)
    with pytest.raises(ArtifactError, match=f"^{graph}: ONNX Runtime"):
        make_session(graph, None)


def _external(location: str) -> TensorProto:
    t = TensorProto(name="v", data_type=TensorProto.FLOAT, dims=[1])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _sparse_constant(output: str, location: str):
    values = _external(location)
    indices = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    return helper.make_node(
        "Constant", [], [output], sparse_value=helper.make_sparse_tensor(values, indices, [1])
    )


def _reads_outside(kind: str, location: str):
    """An edit that makes the graph add a constant read from ``location`` (outside the
    directory) to its logits, stored where ``kind`` says."""

    def edit(model, manifest) -> None:
        g = model.graph
        out = g.output[0].name
        for node in g.node:
            for i, o in enumerate(node.output):
                if o == out:
                    node.output[i] = out + "_pre"
        if kind == "sparse_value":
            g.node.append(_sparse_constant("evil", location))
        elif kind == "function":
            const = helper.make_node("Constant", [], ["y"], value=_external(location))
            opset = [helper.make_opsetid("", model.opset_import[0].version)]
            model.functions.append(
                helper.make_function("evil.dom", "EvilConst", [], ["y"], [const], opset)
            )
            model.opset_import.append(helper.make_opsetid("evil.dom", 1))
            g.node.append(helper.make_node("EvilConst", [], ["evil"], domain="evil.dom"))
        else:  # a sparse constant inside both branches of an If
            cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
            g.node.append(helper.make_node("Constant", [], ["cond"], value=cond))
            branches = {}
            for b in ("then_branch", "else_branch"):
                branches[b] = helper.make_graph(
                    [_sparse_constant(f"{b}_out", location)],
                    b,
                    [],
                    [helper.make_tensor_value_info(f"{b}_out", TensorProto.FLOAT, [1])],
                )
            g.node.append(helper.make_node("If", ["cond"], ["evil"], **branches))
        g.node.append(helper.make_node("Add", [out + "_pre", "evil"], [out]))

    return edit


@pytest.mark.parametrize("kind", ["sparse_value", "function", "if_branch"])
def test_external_data_is_found_anywhere_in_a_graph(exported, tmp_path, capsys, kind):
    out, valid = exported
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0\0\xa0\x40")
    bad = _resealed_copy(out, tmp_path / "bad", _reads_outside(kind, "../../secret.bin"))
    problems = inspect_artifacts(bad).problems
    assert any("reads external data from '../../secret.bin'" in p for p in problems), problems
    for argv in (["verify", bad], ["eval", bad, "--data", valid]):
        line = one_error_line(*run(capsys, *argv)[::2])
        assert "reads external data from '../../secret.bin'" in line
    with pytest.raises(ArtifactError, match="reads external data from"):
        Predictor(bad, threads=1)


# --------------------------------------------------------------------------------------------
# 4. a full disk while taking the output lock


def _full_disk_on_lock_files(monkeypatch) -> None:
    real_write = os.write

    def write(fd: int, data) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_while_taking_the_lock_is_one_line(tmp_path, capsys, monkeypatch):
    ckpt = tiny_world(tmp_path, n=200)[0]
    out = tmp_path / "out"
    _full_disk_on_lock_files(monkeypatch)
    with pytest.raises(ArtifactError, match=r"\.out\.lock: cannot write the lock file: no space"):
        atomic_dir.output_lock(out)
    assert not atomic_dir.lock_path(out).exists()
    code, _, err = run(capsys, "-r", "int8_ptq", ckpt, "--out", out)
    line = one_error_line(code, err)
    assert (
        line
        == f"error: {tmp_path / '.out.lock'}: cannot write the lock file: no space left on device"
    )
    assert not atomic_dir.lock_path(out).exists() and not out.exists()


# --------------------------------------------------------------------------------------------
# 5. features whose ONNX input names collide


def test_one_home_for_feature_input_names():
    assert onnx_spec.sanitize_name is sanitize_name
    assert (onnx_model.DENSE_INPUT, onnx_model.LOGITS) == GRAPH_IO_NAMES


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (["a.b", "a_b"], "features 'a.b' and 'a_b' both map to input 'a_b'"),
        (["dense", "x"], "feature 'dense' maps to input 'dense'"),
    ],
)
def test_colliding_feature_input_names_are_refused_early(tmp_path, features, message):
    config = tmp_path / "cfg.json"
    tables = [{"name": f"t{i}", "feature_names": [f]} for i, f in enumerate(features)]
    config.write_text(json.dumps({"tables": tables}))
    with pytest.raises(ModelConfigError, match=f"^{config}: {message}"):
        load_model_config(config)
    # a model whose features come from elsewhere (a checkpoint, a live module): at plan time
    spec = pipeline.load(tiny_world(tmp_path, n=200)[0]).spec
    renamed = tuple(
        replace(t, feature_names=(f,))
        for t, f in zip(spec.tables, [*features, "c", "d"], strict=True)
    )
    with pytest.raises(ModelConfigError, match=message):
        pipeline.plan(replace(spec, tables=renamed), "int8_ptq")


# --------------------------------------------------------------------------------------------
# 6. --dense-transform against the manifest's


def test_a_dense_transform_contradicting_the_manifest_is_refused(exported, capsys):
    out, valid = exported
    assert json.loads((out / MANIFEST).read_text())["inputs"]["dense"]["transform"]["name"] == (
        "none"
    )
    code, _, err = run(capsys, "eval", out, "--data", valid, "--dense-transform", "log3")
    line = one_error_line(code, err)
    assert "takes 'none'-transformed" in line and "not 'log3' (--dense-transform)" in line
    with pytest.raises(DataError, match="takes 'none'-transformed"):
        Predictor(out, threads=1, dense_transform="log3")
    assert Predictor(out, threads=1, dense_transform="none").dense_transform == "none"


# --------------------------------------------------------------------------------------------
# 7. a model config with no tables


def test_an_empty_tables_list_is_refused(tmp_path, capsys):
    ckpt = tiny_world(tmp_path, n=200)[0]
    config = tmp_path / "cfg.json"
    config.write_text('{"tables": []}')
    with pytest.raises(ModelConfigError, match=f"^{config}: 'tables' is an empty list"):
        load_model_config(config)
    code, _, err = run(capsys, "plan", "-r", "int8_ptq", ckpt, "--model-config", config)
    assert f"{config}: 'tables' is an empty list" in one_error_line(code, err)
