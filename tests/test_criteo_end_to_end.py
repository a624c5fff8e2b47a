"""The real Criteo rows through the whole tool: a 13-dense / 26-table TorchRec DLRM is evaluated on
them as a checkpoint, compressed, and served from its artifacts by ONNX Runtime."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import criteo_sample_path
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compress.cli.main import main


@pytest.fixture
def criteo(tmp_path):
    data = tmp_path / "day_0.tsv"
    shutil.copy(criteo_sample_path(), data)
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(
            name=f"t_cat_{i}",
            embedding_dim=8,
            num_embeddings=1000 + 17 * i,
            feature_names=[f"cat_{i}"],
        )
        for i in range(26)
    ]
    model = DLRM(EmbeddingBagCollection(tables=tables), 13, [16, 8], [16, 1])
    ckpt = tmp_path / "criteo.pt"
    torch.save(model.state_dict(), ckpt)
    return ckpt, data


def _run(capsys, *argv):
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_criteo_rows_through_checkpoint_compression_and_onnx(criteo, tmp_path, capsys):
    ckpt, data = criteo
    scored = _run(capsys, "eval", ckpt, "--data", data, "--json")
    assert scored["n"] == 200
    out = tmp_path / "out"
    summary = _run(capsys, "--recipe", "int8_ptq", ckpt, "--valid", data, "--out", out, "--json")
    # metrics are on the report slice: the last 80% of the --valid rows
    assert summary["metrics_on"] == {"slice": f"{data}[40:200]", "rows": 160}
    report = tmp_path / "report.tsv"
    report.write_text("".join(data.read_text().splitlines(keepends=True)[40:]))
    assert summary["metrics"]["baseline"]["auc"] == pytest.approx(
        _run(capsys, "eval", ckpt, "--data", report, "--json")["auc"]
    )
    served = _run(capsys, "eval", out, "--data", report, "--json")
    assert served["runtime"] == "onnxruntime" and served["n"] == 160
    assert round(served["auc"], 4) == round(summary["metrics"]["compressed"]["auc"], 4)
