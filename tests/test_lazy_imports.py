"""Serving and the light commands run without torch: what a fresh interpreter imports.

``Predictor`` (ONNX Runtime) needs numpy, onnxruntime and the artifact readers only, so its
process holds neither torch nor TorchRec nor FBGEMM (hundreds of MB of resident memory and seconds
of start-up). ``dqrm-compress --help``, ``--version`` and ``verify`` (without ``--parity``) do not
import them either. Each case runs in a fresh subprocess and looks at the modules it imported, so
nothing here depends on timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_world

from compress import pipeline
from exporters.artifacts import write as artifacts
from exporters.onnx.writer import onnx_writer
from exporters.runtime.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
#: What serving must not import (torch is imported by the other two).
HEAVY = ("torch", "torchrec", "fbgemm_gpu")

#: Every built-in layout: fp16, table-wise INT4, row-wise INT4, a ROBE-Z group; INT4 MLPs.
EVERY_LAYOUT_RECIPE = """
name = "every_layout"
[[tables]]
match = ["t_cat_0"]
method = "fp16"
[[tables]]
match = ["t_cat_1"]
method = "ptq"
bits = 4
granularity = "table"
[[tables]]
match = ["t_cat_2"]
method = "ptq"
bits = 4
granularity = "row"
[[tables]]
match = ["t_cat_3"]
method = "share"
compression = 10.0
block_size = 4
[mlp]
method = "ptq"
bits = 4
[finetune]
steps = 2
batch_size = 256
"""

#: Run in a fresh interpreter: open the directory ``argv[1]`` with the Predictor, score the
#: ``.npz`` ``argv[2]`` and one batch of tensors, report the logits and the heavy modules loaded.
PREDICT_SCRIPT = """
import json, sys
import numpy as np
from exporters import Predictor

p = Predictor(sys.argv[1], threads=1)
metrics = p.evaluate(sys.argv[2])
n = 3
dense = np.linspace(-1, 1, n * p.spec.dense_in_features, dtype=np.float32).reshape(n, -1)
values = {f: np.arange(n, dtype=np.int64) for f in p.feature_names}
lengths = {f: np.ones(n, dtype=np.int64) for f in p.feature_names}
logits = p.predict_tensors(dense, values, lengths)
heavy = [m for m in ("torch", "torchrec", "fbgemm_gpu") if m in sys.modules]
print(json.dumps({"metrics": metrics, "logits": logits.tolist(), "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(artifact directory with graphs, the same without graphs, valid .npz) of a small DLRM
    compressed with every built-in layout."""
    tmp = tmp_path_factory.mktemp("served")
    ckpt, train, valid, _ = tiny_world(tmp, "DLRM", n=2000)
    (tmp / "recipe.toml").write_text(EVERY_LAYOUT_RECIPE)
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp / "recipe.toml"), data=train)
    with_graphs = artifacts.save(result, tmp / "out", extra_writers=(onnx_writer(result.model),))
    without = artifacts.save(result, tmp / "plain")
    layouts = {t["layout"] for t in with_graphs.manifest["tables"]}
    assert layouts == {"fp16", "tablewise", "rowwise", "robe"}
    return with_graphs.path, without.path, valid


def _python(*args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh interpreter from the repository root; fails on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _imported(proc: subprocess.CompletedProcess) -> set[str]:
    """Top-level packages a ``python -X importtime`` run imported (read from its stderr)."""
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def _predict_in_fresh_process(path: Path, valid: Path) -> dict:
    return json.loads(_python("-c", PREDICT_SCRIPT, str(path), str(valid)).stdout)


def test_importing_exporters_imports_no_torch() -> None:
    proc = _python("-X", "importtime", "-c", "import exporters; exporters.Predictor")
    imported = _imported(proc)
    assert "exporters" in imported and "onnxruntime" in imported  # the probe sees imports
    assert not imported & set(HEAVY)


def test_the_package_names_its_entry_points_lazily() -> None:
    import exporters
    from exporters.runtime import torchrec_ebc, torchrec_model

    assert exporters.Predictor is Predictor
    assert exporters.load_torchrec_model is torchrec_model.load_torchrec_model
    assert exporters.quantized_ebc_from_artifacts is torchrec_ebc.quantized_ebc_from_artifacts
    with pytest.raises(AttributeError, match="no attribute 'predictor'"):
        exporters.predictor  # noqa: B018


@pytest.mark.parametrize("graphs", [True, False], ids=["stored_graph", "graph_built_in_memory"])
def test_predictor_serves_without_torch(served, graphs: bool) -> None:
    with_graphs, without, valid = served
    path = with_graphs if graphs else without
    got = _predict_in_fresh_process(path, valid)
    assert got["heavy"] == []
    # the same numbers as a Predictor in this process, where torch is loaded
    here = Predictor(path, threads=1)
    assert got["metrics"] == here.evaluate(valid)
    n = 3
    dense = np.linspace(-1, 1, n * here.spec.dense_in_features, dtype=np.float32).reshape(n, -1)
    values = {f: np.arange(n, dtype=np.int64) for f in here.feature_names}
    lengths = {f: np.ones(n, dtype=np.int64) for f in here.feature_names}
    expected = here.predict_tensors(dense, values, lengths)
    assert np.array_equal(np.asarray(got["logits"], np.float32), expected)


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["verify", "--help"], ["eval", "--help"], ["recipes"]],
    ids=["help", "version", "verify_help", "eval_help", "recipes"],
)
def test_light_commands_import_no_torch(argv: list[str]) -> None:
    proc = _python("-X", "importtime", "-m", "compress", *argv)
    imported = _imported(proc)
    assert "click" in imported and "compress" in imported
    assert not imported & set(HEAVY)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_verify_imports_no_torch(served, as_json: bool) -> None:
    path = served[0]
    proc = _python(
        "-X", "importtime", "-m", "compress", "verify", str(path), *(["--json"] * as_json)
    )
    assert (json.loads(proc.stdout)["ok"] is True) if as_json else proc.stdout.startswith("ok: ")
    assert not _imported(proc) & set(HEAVY)


def test_verify_of_a_corrupt_directory_fails_without_torch(served, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(served[0], copy)
    table = copy / "tables" / "t_cat_2.npy"
    data = bytearray(table.read_bytes())
    data[-1] ^= 0xFF
    table.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "compress", "verify", str(copy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "t_cat_2.npy: checksum mismatch" in proc.stderr
    assert not _imported(proc) & set(HEAVY)
