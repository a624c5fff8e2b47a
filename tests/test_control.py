"""The fine-tuning control (``--control``) and recipes that only fine-tune.

``--control`` fine-tunes the uncompressed checkpoint the same way as the run (same steps,
optimizer, data, seed) and reports ``metrics.control`` in ``--json``, the manifest, the printed
summary and the report; it equals what a keep-only recipe with the same ``[finetune]`` scores.
A recipe that keeps every table and the MLP may now hold ``[finetune]`` (it was refused).
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from helpers import tiny_world

from compress.cli.job_report import format_before_after
from compress.cli.main import main
from compress.errors import RecipeError
from compress.recipe.parse import parse_recipe
from compress.report_format import REPORT_DATA_FILE, REPORT_HTML
from exporters.report.data import build_report
from exporters.report.inputs import read_directory

FINETUNE = """
[finetune]
steps = 24
batch_size = 256
optimizer = "sgd"
lr_embedding = 0.3
lr_dense = 0.01
eval_every = 8
seed = 3
"""
QAT = (
    'name = "ctl_qat"\n[[tables]]\nmatch = ["*"]\nmethod = "qat"\nbits = 4\n'
    'granularity = "row"\n' + FINETUNE
)
KEEP_ONLY = 'name = "ctl_keep"\n' + FINETUNE


def run(capsys, *argv):
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("control"))


@pytest.fixture(scope="module")
def controlled(world):
    """A QAT run with ``--control`` (``--json``): its artifact directory and JSON summary."""
    ckpt, train, valid, _ = world
    recipe = ckpt.parent / "qat.toml"
    recipe.write_text(QAT)
    out = ckpt.parent / "qat.out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            [
                "--no-progress",
                "--recipe",
                str(recipe),
                str(ckpt),
                "--data",
                str(train),
                "--valid",
                str(valid),
                "--out",
                str(out),
                "--control",
                "--json",
            ]
        )
    assert code == 0
    return out, json.loads(printed.getvalue())


def _summary(capsys, *argv) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_control_is_reported_beside_baseline_and_compressed(controlled):
    controlled, summary = controlled
    manifest = json.loads((controlled / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert set(metrics) == {"baseline", "before_finetune", "compressed", "control"}
    control, baseline = metrics["control"], metrics["baseline"]
    assert control["n"] == baseline["n"] == metrics["compressed"]["n"]  # the same report slice
    # fine-tuning changed the uncompressed model: the control is not the checkpoint's score
    assert control["logloss"] < baseline["logloss"] - 1e-3
    assert control != metrics["compressed"]
    data = json.loads((controlled / REPORT_DATA_FILE).read_text())["control"]
    assert [e["step"] for e in data["history"]] == [0, 8, 16, 24]
    assert data["steps"] == 24 and data["metrics"] == control
    assert summary["metrics"] == metrics  # --json reports what the manifest records
    assert summary["timings"]["control"] > 0
    stages = list(summary["timings"])
    assert stages.index("control") > stages.index("finetune")


def test_control_equals_a_keep_only_recipe_with_the_same_finetuning(
    world, controlled, tmp_path, capsys
):
    """The second half of the feature: a recipe that only fine-tunes runs (it was refused), and
    it is exactly the control: the same batches, steps and kept step on the same rows."""
    ckpt, train, valid, _ = world
    recipe = tmp_path / "keep.toml"
    recipe.write_text(KEEP_ONLY)
    out = tmp_path / "keep.out"
    s = _summary(capsys, "--recipe", recipe, ckpt, "--data", train, "--valid", valid, "--out", out)
    control = json.loads((controlled[0] / "manifest.json").read_text())["metrics"]["control"]
    assert s["metrics"]["compressed"] == pytest.approx(control, rel=1e-9, abs=1e-12)
    assert s["ratio"] == 1.0 and s["train"]["steps"] == 24
    manifest = json.loads((out / "manifest.json").read_text())
    assert {t["layout"] for t in manifest["tables"]} == {"fp32"}
    state = torch.load(ckpt, weights_only=True)
    trained = torch.from_numpy(np.load(out / manifest["tables"][0]["files"]["data"]))
    before = state["sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight"]
    assert not torch.equal(trained, before)  # the kept tables were fine-tuned


def test_a_recipe_that_does_not_finetune_has_the_checkpoint_as_control(world, tmp_path, capsys):
    ckpt, train, _, _ = world
    s = _summary(
        capsys, "--recipe", "int8_ptq", ckpt, "--data", train, "--out", tmp_path / "p", "--control"
    )
    assert s["metrics"]["control"] == s["metrics"]["baseline"]
    assert any("--control: the recipe does not fine-tune" in n for n in s["notes"])


def test_control_without_data_is_one_line(world, tmp_path, capsys):
    ckpt, _, _, _ = world
    recipe = tmp_path / "qat.toml"
    recipe.write_text(QAT)
    code, out, err = run(capsys, "--recipe", recipe, ckpt, "--out", tmp_path / "o", "--control")
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("error: --control needs --data") and "ctl_qat" in line
    assert not (tmp_path / "o").exists()


def test_control_with_workers_is_one_line(world, tmp_path, capsys):
    ckpt, train, _, _ = world
    code, _, err = run(
        capsys, "--recipe", "int4_qat", ckpt, "--data", train, "--control", "--nproc", "2"
    )
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "--control runs in one process" in line and "--nproc 2" in line


def test_printed_summary_has_the_control_row():
    metric = {"auc": 0.75, "logloss": 0.5, "accuracy": 0.7, "n": 100}
    control = {"auc": 0.7512, "logloss": 0.49, "accuracy": 0.71, "n": 100}
    s = {
        "baseline_precision": "FP32",
        "recipe": "int4_qat",
        "metrics": {"baseline": metric, "before_finetune": None, "compressed": metric},
        "bytes_before": 4000,
        "bytes_after": 1000,
        "ratio": 4.0,
        "out": "o",
    }
    assert "control" not in format_before_after(s)
    text = format_before_after({**s, "metrics": {**s["metrics"], "control": control}})
    assert "control (FP32, same fine-tuning)  0.7512" in text
    assert "compressed - control: AUC -0.0012, log loss +0.0100" in text


def test_report_draws_the_control(controlled):
    controlled, _ = controlled
    report = build_report(read_directory(controlled))
    assert [p.step for p in report.training.control] == [0, 8, 16, 24]
    assert report.metrics["control"] is not None
    assert not any("control run" in m for m in report.missing)
    html = (controlled / REPORT_HTML).read_text(encoding="utf-8")
    assert "control (the same fine-tuning, not compressed)" in html  # the quality table row
    assert "control (not compressed)" in html  # the curve's legend


@pytest.mark.parametrize(
    "text",
    [
        'name = "k"\n' + FINETUNE,
        'name = "k"\n[[tables]]\nmatch = ["*"]\nmethod = "keep"\n' + FINETUNE,
    ],
)
def test_keep_only_recipes_with_finetune_parse(text):
    recipe = parse_recipe(text, "k.toml")
    assert recipe.only_finetunes and recipe.needs_finetune


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'name = "k"\n[[tables]]\nmatch = ["*"]\nmethod = "fp16"\n' + FINETUNE,
            "finetune: nothing is fine-tuned",
        ),
        (
            'name = "k"\n[[tables]]\nmatch = ["*"]\nmethod = "keep"\n[mlp]\nmethod = "ptq"\n'
            "bits = 8\n" + FINETUNE,
            "finetune: nothing is fine-tuned",
        ),
        (
            'name = "k"\n[finetune]\noptimizer = "adam"\n',
            "optimizer 'adam' cannot take the sparse embedding gradients that every kept table",
        ),
    ],
)
def test_recipes_that_compress_without_training_still_refuse_finetune(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, "k.toml")


def test_a_keep_only_recipe_needs_data(world, tmp_path, capsys):
    ckpt, _, _, _ = world
    recipe = tmp_path / "keep.toml"
    recipe.write_text(KEEP_ONLY)
    code, out, err = run(capsys, "--recipe", recipe, ckpt, "--out", tmp_path / "o")
    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: recipe 'ctl_keep' only fine-tunes") and "--data" in last
    assert not (tmp_path / "o").exists()
