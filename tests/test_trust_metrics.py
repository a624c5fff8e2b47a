"""Honest metrics: the kept fine-tuning step is chosen on rows that are never reported, on the
recipe's metric; rules and recipes that change nothing are said out loud; --max-auc-drop fails
the command; best_step, seconds and timings mean what they say."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_world

from compress import pipeline
from compress.cli.job_report import auc_drop_failure
from compress.cli.main import main
from compress.data.npz import load_npz
from compress.errors import DataError, RecipeError
from compress.io.model import load_model
from compress.plan import format_plan, make_plan
from compress.recipe.parse import load_recipe, parse_recipe
from compress.recipe.toml_out import recipe_to_toml
from compress.train import loop as train_module
from compress.train.config import TrainConfig
from compress.train.evaluate import evaluate_model
from compress.train.loop import fit, is_better
from compress.train.validation import HOLDOUT_FRACTION, SELECT_FRACTION, split_validation

QAT = """
name = "tiny_qat"
[[tables]]
match = ["*"]
method = "qat"
bits = 4
granularity = "row"
[finetune]
steps = 4
batch_size = 256
eval_every = 2
"""

# a size class the tiny model does not have, then a rule that does apply
UNUSED_RULE = """
name = "with_unused_rule"
[[tables]]
match = ["*"]
min_rows = 100000
method = "ptq"
bits = 4
[[tables]]
match = ["*"]
method = "ptq"
bits = 8
"""

INT2 = """
name = "int2"
[[tables]]
match = ["*"]
method = "ptq"
bits = 2
granularity = "table"
[mlp]
method = "ptq"
bits = 4
"""


@pytest.fixture
def world(tmp_path):
    return tiny_world(tmp_path)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------ the split


def test_selection_slice_is_the_head_of_the_validation_rows_and_report_the_rest() -> None:
    from compress.data.synthetic import SyntheticConfig, generate

    data = generate(SyntheticConfig(table_sizes=(10,), num_samples=1000, num_dense=2, seed=0))
    slices = split_validation(data, "v.npz", offset=4000)
    assert len(slices.select) == 200 and len(slices.report) == 800
    assert (slices.select_name, slices.report_name) == ("v.npz[4000:4200]", "v.npz[4200:5000]")
    assert (slices.select.labels == data.labels[:200]).all()
    assert (slices.report.labels == data.labels[200:]).all()
    assert SELECT_FRACTION == HOLDOUT_FRACTION == 0.2
    with pytest.raises(DataError, match="too few"):
        split_validation(data.slice(0, 2), "v.npz")


def test_metrics_are_on_report_rows_and_selection_on_the_other_rows(world, tmp_path) -> None:
    ckpt, train, valid, _ = world
    (tmp_path / "qat.toml").write_text(QAT)
    job = pipeline.load(ckpt)
    result = pipeline.compress(
        job, pipeline.plan(job, tmp_path / "qat.toml"), data=train, valid=valid
    )
    # 1500 validation rows: the first 300 select, the other 1200 are reported
    assert result.train.selected_on == {
        "slice": f"{valid}[0:300]",
        "rows": 300,
        "metric": "logloss",
    }
    assert all(h["metrics"]["n"] == 300 for h in result.train.history)
    assert [result.metrics[k]["n"] for k in ("baseline", "before_finetune", "compressed")] == [
        1200
    ] * 3
    assert result.data["report"] == f"{valid}[300:1500]"
    report = load_npz(valid).slice(300, 1500)
    names = job.spec.feature_names
    assert result.metrics["baseline"] == evaluate_model(job.module, report, names)
    assert result.metrics["compressed"] == evaluate_model(result.model, report, names)
    # the kept step is the best by log loss on the selection rows
    best = min(result.train.history, key=lambda h: h["metrics"]["logloss"])
    assert result.train.best_step == best["step"]


def test_without_valid_the_tail_of_data_is_held_out_and_split(world, tmp_path) -> None:
    ckpt, train, _, _ = world
    (tmp_path / "qat.toml").write_text(QAT)
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp_path / "qat.toml"), data=train)
    # 4500 rows: 3600 train, 180 select, 720 report
    assert result.train.selected_on == {
        "slice": f"{train}[3600:3780]",
        "rows": 180,
        "metric": "logloss",
    }
    assert result.data["report"] == f"{train}[3780:4500]"
    assert result.data["valid"] == f"last 20% of {train}"
    assert result.metrics["compressed"]["n"] == 720


# ------------------------------------------------------------------------------------ selection


def _scripted_fit(monkeypatch, world, scores: list[tuple[float, float]], select_on: str):
    """fit() with evaluations that return ``scores`` ((auc, logloss) per evaluation, in order)."""
    ckpt, train, valid, _ = world
    job = load_model(ckpt)
    calls = iter(scores)

    def scripted(logits, labels):
        auc, logloss = next(calls)
        return {"auc": auc, "logloss": logloss, "accuracy": 0.5, "n": len(labels)}

    monkeypatch.setattr(train_module, "evaluate", scripted)
    config = TrainConfig(steps=4, batch_size=256, eval_every=2, select_on=select_on)
    data = load_npz(train)
    return fit(job.module, data, load_npz(valid), job.spec.feature_names, config)


# step 2 has the best AUC, step 4 the best log loss (AUC up while log loss got worse, and back)
SCRIPT = [(0.60, 0.50), (0.70, 0.60), (0.65, 0.45)]


def test_keep_best_selects_on_log_loss_by_default(monkeypatch, world) -> None:
    assert TrainConfig().select_on == "logloss"
    assert _scripted_fit(monkeypatch, world, SCRIPT, "logloss").best_step == 4


def test_keep_best_can_select_on_auc(monkeypatch, world) -> None:
    assert _scripted_fit(monkeypatch, world, SCRIPT, "auc").best_step == 2


def test_is_better_direction() -> None:
    assert is_better("logloss", {"logloss": 0.4}, {"logloss": 0.5})
    assert not is_better("logloss", {"logloss": 0.5}, {"logloss": 0.5})
    assert is_better("auc", {"auc": 0.8}, {"auc": 0.7})
    with pytest.raises(ValueError, match="unknown selection metric"):
        is_better("accuracy", {}, {})


def test_no_validation_means_no_best_step(world) -> None:
    ckpt, train, _, _ = world
    job = load_model(ckpt)
    config = TrainConfig(steps=2, batch_size=256, eval_every=1)
    result = fit(job.module, load_npz(train), None, job.spec.feature_names, config)
    assert result.best_step is None and result.best_metrics is None


def test_distillation_without_validation_reports_no_best_step(world) -> None:
    ckpt, *_ = world
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, "int4_qat"), steps=2)
    assert result.train.best_step is None and result.train.selected_on is None


def test_a_run_that_never_improves_says_so(monkeypatch, world, tmp_path) -> None:
    ckpt, train, valid, _ = world
    (tmp_path / "qat.toml").write_text(QAT)
    worse = iter([(0.6, 0.5), (0.55, 0.6), (0.5, 0.7)])
    monkeypatch.setattr(
        train_module,
        "evaluate",
        lambda logits, labels: dict(zip(("auc", "logloss"), next(worse), strict=True), n=300),
    )
    job = pipeline.load(ckpt)
    result = pipeline.compress(
        job, pipeline.plan(job, tmp_path / "qat.toml"), data=train, valid=valid
    )
    assert result.train.best_step == 0
    assert any("did not improve logloss" in n for n in result.notes)


# ------------------------------------------------------------------------------------ recipe key


def test_select_on_recipe_key() -> None:
    base = QAT.replace("eval_every = 2", "eval_every = 2\nselect_on = {}")
    recipe = parse_recipe(base.format('"auc"'), "r.toml")
    assert recipe.finetune.select_on == "auc"
    assert parse_recipe(recipe_to_toml(recipe)) == recipe
    assert 'select_on = "logloss"' in recipe_to_toml(load_recipe("int4_qat"))
    with pytest.raises(
        RecipeError,
        match=r'^r.toml: finetune: select_on must be one of "logloss", "auc", got "accuracy"$',
    ):
        parse_recipe(base.format('"accuracy"'), "r.toml")
    with pytest.raises(RecipeError, match="select_on must be a string"):
        parse_recipe(base.format("1"), "r.toml")


# ------------------------------------------------------------------------------------ no-op rules


def test_a_rule_that_changes_no_table_is_a_warning(world) -> None:
    ckpt, *_ = world
    job = pipeline.load(ckpt)
    plan = make_plan(parse_recipe(UNUSED_RULE, "u.toml"), job.spec)
    (warning,) = plan.warnings
    assert warning == (
        "u.toml: tables[0] (* rows>=100000: ptq INT4 row) changes no table: its row bounds leave "
        "out every table it matches: t_cat_0 (20 rows), t_cat_1 (300 rows), t_cat_2 (2,000 rows), "
        "t_cat_3 (5,000 rows)"
    )
    assert f"warning: {warning}" in format_plan(plan)
    assert plan.to_json()["warnings"] == [warning]


def test_a_rule_shadowed_by_earlier_rules_is_a_warning(world) -> None:
    ckpt, *_ = world
    job = pipeline.load(ckpt)
    text = (
        'name = "s"\n[[tables]]\nmatch = ["t_cat_1", "t_cat_2"]\nmethod = "ptq"\nbits = 4\n'
        '[[tables]]\nmatch = ["t_cat_1"]\nmethod = "fp16"\n'
    )
    plan = make_plan(parse_recipe(text, "u.toml"), job.spec)
    assert plan.warnings == (
        "u.toml: tables[1] (t_cat_1: fp16) changes no table: earlier rules decide the tables it "
        "matches (tables[0])",
    )


def test_a_keep_rule_that_decides_nothing_is_no_warning(world) -> None:
    ckpt, *_ = world
    job = pipeline.load(ckpt)
    text = 'name = "k"\n[[tables]]\nmatch = ["*"]\nmax_rows = 5\nmethod = "keep"\n[mlp]\nmethod = "ptq"\nbits = 8\n'
    plan = make_plan(parse_recipe(text, "k.toml"), job.spec)
    assert plan.unused_rules == (0,) and plan.warnings == ()


def test_a_recipe_that_changes_nothing_is_an_error(world, capsys) -> None:
    ckpt, train, _, _ = world
    with pytest.raises(
        RecipeError, match=r"robe_100x.toml: the recipe changes nothing in this model"
    ):
        pipeline.plan(pipeline.load(ckpt), "robe_100x")
    code, out, err = run(capsys, "--recipe", "robe_100x", ckpt, "--data", train)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "changes nothing" in line and "row bounds leave out every table" in line
    assert not (ckpt.parent / "model.robe_100x").exists()


def test_an_mlp_only_recipe_changes_something(world) -> None:
    ckpt, *_ = world
    text = 'name = "m"\n[mlp]\nmethod = "ptq"\nbits = 8\n'
    plan = make_plan(parse_recipe(text, "m.toml"), pipeline.load(ckpt).spec)
    assert plan.mlp.method == "ptq" and plan.warnings == ()


def test_warnings_reach_the_text_output_and_the_json_notes(world, tmp_path, capsys) -> None:
    ckpt, _, valid, _ = world
    (tmp_path / "u.toml").write_text(UNUSED_RULE)
    code, stdout, err = run(
        capsys, "--recipe", tmp_path / "u.toml", ckpt, "--valid", valid, "--out", tmp_path / "a"
    )
    assert code == 0
    assert sum("warning: " in line and "changes no table" in line for line in err.splitlines()) >= 1
    assert f"metrics on {valid}[300:1500] (1,200 rows, never used for selection)" in stdout
    code, out, _ = run(
        capsys,
        "--recipe",
        tmp_path / "u.toml",
        ckpt,
        "--valid",
        valid,
        "--out",
        tmp_path / "b",
        "--json",
    )
    notes = json.loads(out)["notes"]
    assert code == 0 and [n for n in notes if "changes no table" in n][0].startswith("warning: ")


# ------------------------------------------------------------------------------------ --max-auc-drop


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained on the tiny world (so AUC is well above 0.5 and INT2 costs some),
    its validation file and an INT2 recipe."""
    tmp = tmp_path_factory.mktemp("trained")
    ckpt, train, valid, _ = tiny_world(tmp)
    job = load_model(ckpt)
    config = TrainConfig(epochs=2, batch_size=128, lr_embedding=0.1, lr_dense=0.05, seed=0)
    fit(job.module, load_npz(train), None, job.spec.feature_names, config)
    trained_ckpt = tmp / "trained.pt"
    torch.save(job.module.state_dict(), trained_ckpt)
    (tmp / "int2.toml").write_text(INT2)
    return trained_ckpt, valid, tmp / "int2.toml"


@pytest.mark.slow
def test_max_auc_drop_fails_and_writes_nothing(trained, tmp_path, capsys) -> None:
    ckpt, valid, recipe = trained
    out = tmp_path / "out"
    code, stdout, _ = run(
        capsys, "--recipe", recipe, ckpt, "--valid", valid, "--out", out, "--json"
    )
    summary = json.loads(stdout)
    drop = summary["metrics"]["baseline"]["auc"] - summary["metrics"]["compressed"]["auc"]
    assert code == 0 and drop > 0.005 and summary["max_auc_drop"] is None
    failing = tmp_path / "failing"
    code, stdout, err = run(
        capsys,
        "--recipe",
        recipe,
        ckpt,
        "--valid",
        valid,
        "--out",
        failing,
        "--max-auc-drop",
        drop / 2,
    )
    assert code == 3 and stdout == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: compressed AUC") and "--max-auc-drop" in line
    assert f"nothing written to {failing}" in line
    assert not failing.exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".failing")
    ]
    # a drop within the limit passes
    code, _, _ = run(
        capsys,
        "--recipe",
        recipe,
        ckpt,
        "--valid",
        valid,
        "--out",
        tmp_path / "ok",
        "--max-auc-drop",
        drop * 2,
    )
    assert code == 0 and (tmp_path / "ok" / "manifest.json").exists()


@pytest.mark.slow
def test_keep_failed_writes_the_artifacts_and_still_exits_3(trained, tmp_path, capsys) -> None:
    ckpt, valid, recipe = trained
    out = tmp_path / "kept"
    code, stdout, err = run(
        capsys,
        "--recipe",
        recipe,
        ckpt,
        "--valid",
        valid,
        "--out",
        out,
        "--max-auc-drop",
        0,
        "--keep-failed",
        "--json",
    )
    assert code == 3 and (out / "manifest.json").exists()
    assert json.loads(stdout)["max_auc_drop"] == 0
    assert "artifacts kept in" in err.strip().splitlines()[-1]
    assert main(["verify", str(out)]) == 0


def test_max_auc_drop_needs_validation_data(world, capsys) -> None:
    ckpt, *_ = world
    code, _, err = run(capsys, "--recipe", "int8_ptq", ckpt, "--max-auc-drop", 0.01)
    assert code == 2 and "--max-auc-drop needs validation data" in err


def test_auc_drop_failure_is_exact_at_the_limit() -> None:
    metrics = {"baseline": {"auc": 0.75}, "compressed": {"auc": 0.70}}
    assert auc_drop_failure(metrics, None) is None
    assert auc_drop_failure(metrics, 0.06) is None
    message = auc_drop_failure(metrics, 0.04)
    assert message == (
        "compressed AUC 0.7000 is 0.0500 below the baseline 0.7500, more than --max-auc-drop 0.04"
    )


# ------------------------------------------------------------------------------------ timings


def test_json_seconds_is_the_whole_command_and_timings_cover_each_stage(
    world, tmp_path, capsys
) -> None:
    ckpt, train, valid, _ = world
    (tmp_path / "qat.toml").write_text(QAT)
    code, out, err = run(
        capsys,
        "--recipe",
        tmp_path / "qat.toml",
        ckpt,
        "--data",
        train,
        "--valid",
        valid,
        "--out",
        tmp_path / "o",
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    timings = summary["timings"]
    stages = [
        "load",
        "plan",
        "data",
        "evaluate",
        "quantize",
        "finetune",
        "convert",
        "report",
        "export",
        "parity",
    ]
    assert list(timings) == [*stages, "data_wait"]  # data_wait: the part of finetune spent waiting
    assert all(v >= 0 for v in timings.values())
    assert sum(timings[s] for s in stages) <= summary["seconds"] + 1e-9
    assert timings["data_wait"] <= timings["finetune"]
    assert summary["train"]["seconds"] <= timings["finetune"] + 1e-3
    assert summary["train"]["best_step"] in (0, 2, 4)
    assert summary["train"]["selected_on"] == {
        "slice": f"{valid}[0:300]",
        "rows": 300,
        "metric": "logloss",
    }
    assert summary["metrics_on"] == {"slice": f"{valid}[300:1500]", "rows": 1200}
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["train"]["selected_on"] == summary["train"]["selected_on"]
    assert "timings" not in manifest  # artifacts stay reproducible


def test_text_output_names_the_kept_step_and_both_slices(world, tmp_path, capsys) -> None:
    ckpt, train, valid, _ = world
    (tmp_path / "qat.toml").write_text(QAT)
    argv = ("--recipe", tmp_path / "qat.toml", ckpt, "--data", train, "--valid", valid)
    code, stdout, err = run(capsys, *argv, "--out", tmp_path / "o")
    assert code == 0, err
    assert "selection auc" in err  # the training log scores the selection rows
    kept = [line for line in stdout.splitlines() if line.startswith("kept fine-tuning step ")]
    assert len(kept) == 1 and kept[0].endswith(f"of 4: best logloss on {valid}[0:300] (300 rows)")
    assert f"metrics on {valid}[300:1500] (1,200 rows, never used for selection)" in stdout
