"""The main job end to end on a small model: plan sizes, artifacts, metrics, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_world

from compress import pipeline
from compress.data.npz import load_npz
from compress.errors import ArtifactError
from compress.train.evaluate import evaluate_model
from compress.train.validation import split_validation
from exporters.artifacts import write as artifacts

RECIPE = """
name = "tiny_mix"
[[tables]]
match = ["t_cat_0"]
method = "keep"
[[tables]]
match = ["t_cat_1"]
method = "fp16"
[[tables]]
match = ["t_cat_2"]
method = "qat"
bits = 4
granularity = "table"
scale_refresh = 5
[[tables]]
match = ["*"]
method = "qat"
bits = 2
granularity = "row"
[mlp]
method = "qat"
bits = 4
[finetune]
steps = 6
batch_size = 256
eval_every = 3
"""


@pytest.fixture
def world(tmp_path):
    return tiny_world(tmp_path)


def test_ptq_sizes_on_disk_equal_plan(world, tmp_path):
    ckpt, train, valid, _ = world
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, "int8_ptq")
    result = pipeline.compress(job, plan, valid=valid)
    assert result.train is None and result.metrics["baseline"] is not None
    written = artifacts.save(result, tmp_path / "out")
    for entry in written.manifest["tables"]:
        assert entry["bytes"] == entry["bytes_planned"] == plan.table(entry["name"]).bytes_after
        on_disk = sum(
            np.load(tmp_path / "out" / f, mmap_mode="r").nbytes for f in entry["files"].values()
        )
        assert on_disk == entry["bytes"]
    assert written.manifest["bytes"]["dense"] == plan.dense_bytes_after
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (
        manifest["files"]["tables/t_cat_3.npy"]["bytes"]
        == (tmp_path / "out/tables/t_cat_3.npy").stat().st_size
    )


def test_qat_mixed_recipe_end_to_end(world, tmp_path):
    ckpt, train, valid, _ = world
    recipe = tmp_path / "mix.toml"
    recipe.write_text(RECIPE)
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, recipe)
    result = pipeline.compress(job, plan, data=train, valid=valid)
    assert result.train.steps == 6 and [h["step"] for h in result.train.history] == [0, 3, 6]
    for key in ("baseline", "before_finetune", "compressed"):
        assert set(result.metrics[key]) >= {"auc", "logloss", "accuracy", "n"}
    # the converted model scores exactly what the kept step scored on the selection slice; the
    # reported metrics are on the other (report) slice of the validation rows
    slices = split_validation(load_npz(valid), str(valid))
    names = job.spec.feature_names
    assert evaluate_model(result.model, slices.select, names) == result.train.best_metrics
    assert evaluate_model(result.model, slices.report, names) == result.metrics["compressed"]
    written = artifacts.save(result, tmp_path / "out")
    by_name = {t["name"]: t for t in written.manifest["tables"]}
    assert by_name["t_cat_0"]["layout"] == "fp32" and by_name["t_cat_1"]["layout"] == "fp16"
    assert by_name["t_cat_2"]["layout"] == "tablewise" and by_name["t_cat_3"]["layout"] == "rowwise"
    assert all(t["bytes"] == plan.table(n).bytes_after for n, t in by_name.items())
    assert (tmp_path / "out" / "train_log.jsonl").read_text().count("\n") == 3


def test_same_inputs_same_artifacts(world, tmp_path):
    ckpt, train, valid, _ = world
    recipe = tmp_path / "mix.toml"
    recipe.write_text(RECIPE)
    manifests = []
    for out in ("a", "b"):
        job = pipeline.load(ckpt)
        result = pipeline.compress(job, pipeline.plan(job, recipe), data=train, valid=valid)
        manifests.append(artifacts.save(result, tmp_path / out).manifest["files"])
    assert manifests[0] == manifests[1]


def test_distillation_without_data_is_announced(world):
    ckpt, *_ = world
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, "int4_qat")
    result = pipeline.compress(job, plan, steps=3)
    assert any("distillation" in n for n in result.notes)
    assert result.metrics["compressed"] is None and result.train.steps == 3


def test_failed_write_leaves_nothing(world, tmp_path, monkeypatch):
    ckpt, _, valid, _ = world
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, "int8_ptq"), valid=valid)

    def boom(stage, manifest):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifacts.save(result, tmp_path / "out", extra_writers=(boom,))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    artifacts.save(result, tmp_path / "out")
    with pytest.raises(ArtifactError, match="already exists"):
        artifacts.save(result, tmp_path / "out")


def test_int4_mlp_weights_stored_packed(world, tmp_path):
    ckpt, _, valid, _ = world
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, "int4_ptq"), valid=valid)
    written = artifacts.save(result, tmp_path / "out")
    q = [d for d in written.manifest["dense"] if d["key"].endswith("qweight")]
    assert q and all(d["layout"] == "int4_offset_packed" for d in q)
    first = q[0]
    stored = np.load(tmp_path / "out" / first["file"])
    out_f, in_f = first["shape"]
    assert stored.shape == (out_f, (in_f + 1) // 2) and stored.dtype == np.uint8
    module = dict(result.model.named_modules())[first["key"].rsplit(".", 1)[0]]
    low = (torch.from_numpy(stored) & 0xF).to(torch.int16) - 8
    assert torch.equal(low[:, : (in_f + 1) // 2], module.qweight[:, 0::2].to(torch.int16))
