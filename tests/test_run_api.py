"""compress.run: the whole job in one call, equal to the command line's main job; live modules,
Recipe objects, in-process batches, size budgets, and the output guarantees."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_world

import compress
from compress.api import RunResult, resolve_recipe
from compress.budget.spec import BudgetError
from compress.cli.main import main
from compress.data.dataset import Dataset
from compress.data.npz import load_npz, save_npz
from compress.errors import ArtifactError, QualityGateError, SettingError
from compress.recipe.parse import load_recipe


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    ckpt, train, valid, model = tiny_world(tmp)
    return tmp, ckpt, train, valid, model


@pytest.mark.slow
def test_run_is_the_main_job_in_one_call(world, capsys):
    tmp, ckpt, train, valid, _ = world
    result = compress.run(ckpt, "int4_qat", data=train, valid=valid, out=tmp / "api", steps=12)
    assert isinstance(result, RunResult)
    assert result.out == tmp / "api" and (result.out / "manifest.json").is_file()
    assert result.report == tmp / "api" / "report.html" and result.report.is_file()
    code = main(
        [
            str(a)
            for a in [
                "--recipe",
                "int4_qat",
                ckpt,
                "--data",
                train,
                "--valid",
                valid,
                "--steps",
                12,
                "--out",
                tmp / "cli",
                "--json",
            ]
        ]  # fmt: skip
    )
    cli = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result.metrics == cli["metrics"]
    assert (result.bytes_before, result.bytes_after) == (cli["bytes_before"], cli["bytes_after"])
    assert result.ratio == pytest.approx(cli["ratio"])
    summary = result.summary()
    assert summary["recipe"] == "int4_qat" and summary["out"] == str(tmp / "api")
    # the artifacts hold the same tables (the manifests differ only in where they were written)
    api_manifest = json.loads((tmp / "api" / "manifest.json").read_text())
    cli_manifest = json.loads((tmp / "cli" / "manifest.json").read_text())
    assert api_manifest["files"] == cli_manifest["files"]


def test_run_takes_a_module_a_recipe_object_and_batches_and_writes_nothing_without_out(world):
    tmp, _, train, valid, model = world
    before = sorted(p.name for p in tmp.iterdir())
    names = tuple(
        f for c in model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
        for f in c.feature_names
    )  # fmt: skip
    batches = list(load_npz(train).batches(700, feature_names=names))
    held = list(load_npz(valid).batches(700, feature_names=names))
    result = compress.run(model, load_recipe("int8_ptq"), data=batches, valid=held)
    assert result.out is None and result.report is None
    assert sorted(p.name for p in tmp.iterdir()) == before  # nothing written
    assert result.metrics["compressed"]["n"] > 0
    assert result.compression.data["train"] == "<in-process batches>"
    assert result.bytes_after == result.plan.bytes_after < result.bytes_before


@pytest.mark.slow
def test_run_with_a_size_budget(world):
    tmp, ckpt, train, valid, _ = world
    result = compress.run(ckpt, "60x", data=train, valid=valid, out=tmp / "budget", steps=4)
    assert result.budget is not None and result.budget["budget"] == "60x"
    assert result.bytes_after <= result.budget["budget_bytes"]
    assert result.plan.recipe_name == "budget_60x"
    assert (tmp / "budget" / "recipe.toml").is_file()  # the chosen recipe, to run it again


def test_run_refuses_what_the_command_line_refuses(world):
    tmp, ckpt, train, valid, _ = world
    out = tmp / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"exists: already exists \(force=True replaces it\)"):
        compress.run(ckpt, "int8_ptq", valid=valid, out=out)
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        compress.run(ckpt, "int8_ptq", valid=valid, out=out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(BudgetError, match=r"budget: budget '3XB': unknown unit 'XB'"):
        compress.run(ckpt, "3XB", data=train)
    with pytest.raises(SettingError, match="recipe must be a built-in name"):
        compress.run(ckpt, 3.5, data=train)  # type: ignore[arg-type]
    assert resolve_recipe(3_000_000).budget.nbytes == 3_000_000


def test_run_quality_gate(world):
    tmp, ckpt, _, valid, _ = world
    rows = load_npz(valid)  # labels flipped: the untrained model's AUC is above 0.5 on them,
    flipped = tmp / "flipped.npz"  # and table-wise INT4 moves it towards 0.5
    save_npz(Dataset(rows.dense, 1 - rows.labels, rows.values, rows.offsets, None, "none"), flipped)
    valid = flipped
    free = compress.run(ckpt, "int4_ptq", valid=valid)
    drop = free.metrics["baseline"]["auc"] - free.metrics["compressed"]["auc"]
    assert drop > 0
    with pytest.raises(QualityGateError, match=r"more than --max-auc-drop .*nothing written"):
        compress.run(ckpt, "int4_ptq", valid=valid, out=tmp / "gate", max_auc_drop=drop / 2)
    assert not (tmp / "gate").exists()
    kept = compress.run(
        ckpt, "int4_ptq", valid=valid, out=tmp / "gate", max_auc_drop=drop / 2, keep_failed=True
    )
    assert kept.quality_gate["passed"] is False
    manifest = json.loads((tmp / "gate" / "manifest.json").read_text())
    assert manifest["quality_gate"]["passed"] is False
