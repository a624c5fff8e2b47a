"""``--budget``: budget strings, the exact knapsack, option bytes equal to the plan's, the measured
sensitivity equal to the compressed model's own log loss, the budget recipe key, impossible
budgets, and an end-to-end tiny run whose artifacts fit the budget and whose saved recipe repeats
the plan."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_world
from torch.nn import functional as F  # noqa: N812

from compress import pipeline
from compress.budget import knapsack
from compress.budget.choose import check_budget, fitting, refinements, solve_measured
from compress.budget.options import (
    Option,
    budget_recipe,
    mlp_options,
    one_rule_recipe,
    table_options,
)
from compress.budget.sensitivity import (
    baseline_logloss,
    cache_slice,
    mean_logloss,
    measure,
)
from compress.budget.spec import BudgetError, parse_budget
from compress.cli.main import main
from compress.errors import RecipeError
from compress.methods.apply_plan import convert_model, prepare_model
from compress.plan import make_plan
from compress.recipe.parse import parse_recipe
from compress.recipe.schema import MLPSettings, Recipe
from compress.recipe.toml_out import recipe_to_toml
from compress.train.config import TrainConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The small checkpoint and data of :func:`helpers.tiny_world`, shared read-only."""
    return tiny_world(tmp_path_factory.mktemp("budget_world"))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------
# budget strings


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("3MB", 3_000_000),
        ("3mb", 3_000_000),
        ("3 MiB", 3 * 2**20),
        ("2.5KB", 2_500),
        ("1.9999B", 1),
        ("1_000", 1_000),
        ("7", 7),
        ("1.5GiB", 3 * 2**29),
        (" 12kib ", 12 * 1024),
    ],
)
def test_budget_sizes_are_bytes_rounded_down(text, nbytes):
    budget = parse_budget(text)
    assert budget.nbytes == nbytes
    assert budget.resolve(10**15) == nbytes
    assert " " not in budget.name and budget.name.startswith("budget_")


def test_budget_integer_and_ratio():
    assert parse_budget(4096).nbytes == 4096
    ratio = parse_budget("100x")
    assert ratio.ratio == Fraction(100)
    assert ratio.resolve(95_000_123) == 950_001  # rounded down
    assert parse_budget("2.5x").resolve(1000) == 400
    assert "1/100 of 95,000,123" in ratio.describe(95_000_123)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "cannot read budget"),
        ("abc", "cannot read budget"),
        ("-3MB", "cannot read budget"),
        ("3 XB", "unknown unit 'XB'"),
        ("3M", "unknown unit 'M'"),
        ("1x", "more than 1"),
        ("0.5x", "more than 1"),
        ("0", "less than 1 byte"),
        ("0.4B", "less than 1 byte"),
        ("9" * 60, "too long"),
        (0, "at least 1 byte"),
        (3.5, "got float"),
        (True, "got bool"),
    ],
)
def test_bad_budgets_are_one_line_errors(value, says):
    with pytest.raises(BudgetError, match="--budget") as e:
        parse_budget(value)
    assert says in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# the knapsack


def exact_by_bytes(items, budget: int) -> float:
    """The least loss within ``budget`` by a DP over every byte total (small byte values)."""
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    for options in items:
        nxt = np.full(budget + 1, np.inf)
        for b, loss in options:
            if b <= budget:
                nxt[b:] = np.minimum(nxt[b:], best[: budget + 1 - b] + loss)
        best = nxt
    return float(best.min())


def test_knapsack_never_exceeds_the_budget_and_is_optimal_on_random_tables():
    rng = np.random.default_rng(0)
    for _ in range(150):
        n_items = int(rng.integers(1, 25))
        items = [
            [(int(rng.integers(0, 80)), float(rng.normal())) for _ in range(rng.integers(1, 12))]
            for _ in range(n_items)
        ]
        budget = int(rng.integers(0, 60 * n_items))
        reference = exact_by_bytes(items, budget)
        if not np.isfinite(reference):
            with pytest.raises(knapsack.Infeasible):
                knapsack.solve(items, budget)
            continue
        solution = knapsack.solve(items, budget)
        chosen = [items[j][k] for j, k in enumerate(solution.choice)]
        assert sum(b for b, _ in chosen) == solution.bytes <= budget
        assert solution.loss == pytest.approx(sum(loss for _, loss in chosen))
        assert solution.loss == pytest.approx(reference, abs=1e-9)


def test_knapsack_matches_brute_force_on_small_cases():
    rng = np.random.default_rng(1)
    for _ in range(200):
        items = [
            [(int(rng.integers(0, 10**6)), float(rng.normal())) for _ in range(rng.integers(1, 6))]
            for _ in range(int(rng.integers(1, 6)))
        ]
        budget = int(rng.integers(0, 3 * 10**6))
        brute = knapsack.brute_force(items, budget)
        if brute is None:
            with pytest.raises(knapsack.Infeasible):
                knapsack.solve(items, budget)
            continue
        solution = knapsack.solve(items, budget)
        chosen = [items[j][k] for j, k in enumerate(solution.choice)]
        assert solution.bytes == sum(b for b, _ in chosen) <= budget
        assert solution.loss == pytest.approx(brute[1], abs=1e-12)
        assert solution.choice == brute[0]  # random losses: the optimum is unique


def test_knapsack_on_large_byte_counts_and_many_options():
    """Realistic sizes: 27 items of 20 options up to 10^8 bytes, the budget met to the byte."""
    rng = np.random.default_rng(2)
    items = []
    for _ in range(27):
        size = int(rng.integers(100, 10**8))
        ratios = np.geomspace(1, 8192, 20)
        items.append(
            [(int(size / r), float(abs(rng.normal()) * np.log2(r) * 1e-4)) for r in ratios]
        )
    total = sum(o[0][0] for o in items)
    for ratio in (10, 100, 1000):
        budget = total // ratio
        solution = knapsack.solve(items, budget)
        assert solution.bytes <= budget
        assert solution.bytes > budget * 0.5  # it uses the room it has


def test_knapsack_ties_and_errors():
    # equal loss: the choice with fewer bytes
    assert knapsack.solve([[(10, 1.0), (5, 1.0)], [(0, 0.0)]], 100).choice == (1, 0)
    with pytest.raises(knapsack.Infeasible) as e:
        knapsack.solve([[(10, 0.0), (7, 1.0)], [(5, 0.0)]], 11)
    assert e.value.min_bytes == 12
    with pytest.raises(ValueError, match="no options"):
        knapsack.solve([[]], 10)
    with pytest.raises(ValueError, match="not finite"):
        knapsack.solve([[(1, float("nan"))]], 10)


def test_budget_plans_fit_exactly_with_the_least_loss_on_random_sensitivities(world):
    """The model's real options (their exact bytes) with random costs: the solver's choice, written
    as a recipe and planned, takes exactly the bytes it counted, never more than the budget, and
    its loss is the least any choice within the budget has (a dynamic programme over every byte
    total)."""
    spec = pipeline.load(world[0]).spec
    items = [table_options(t) for t in spec.tables] + [mlp_options(spec)]
    names = [t.name for t in spec.tables]
    rng = np.random.default_rng(3)
    floor = sum(min(o.nbytes for o in options) for options in items)
    keep = sum(options[0].nbytes for options in items)
    for trial in range(12):
        # costs that fall as bytes grow (as measured ones do), with noise; keep costs 0
        costs = {
            (j, k): 0.0
            if o.is_keep
            else float(rng.exponential(1.0) / np.log2(2 + o.nbytes) + rng.uniform(0, 0.05))
            for j, options in enumerate(items)
            for k, o in enumerate(options)
        }
        budget = int(rng.integers(floor, keep))
        choice, solution = solve_measured(items, costs, budget)
        problem = [
            [(o.nbytes, costs[(j, k)]) for k, o in enumerate(opts)] for j, opts in enumerate(items)
        ]
        assert solution.loss == pytest.approx(exact_by_bytes(problem, budget), abs=1e-9)
        recipe = budget_recipe(
            f"b{trial}", "", spec, {n: items[j][choice[j]] for j, n in enumerate(names)},
            items[-1][choice[-1]], TrainConfig(steps=1),
        )  # fmt: skip
        plan = make_plan(recipe, spec)
        assert plan.bytes_after == solution.bytes <= budget
        for j, name in enumerate(names):
            assert plan.table(name).bytes_after == items[j][choice[j]].nbytes
    with pytest.raises(knapsack.Infeasible):
        solve_measured(items, costs, floor - 1)


def test_options_that_cannot_fit_are_left_out():
    def item(*sizes):
        return [Option(str(b), (("method", str(b)),), b) for b in sizes]

    items = [item(100, 40, 10), item(50, 5), item(7)]
    # the smallest choice takes 10 + 5 + 7 = 22 bytes; room 60 leaves 38 to spare
    assert fitting(items, 60) == {(0, 1), (0, 2), (1, 1), (2, 0)}
    assert fitting(items, 22) == {(0, 2), (1, 1), (2, 0)}
    assert fitting(items, 200) == {(j, k) for j in range(3) for k in range(len(items[j]))}


def test_solve_measured_uses_only_measured_options_and_refines_shared_arrays():
    share = (("method", "share"), ("compression", 8.0))
    items = [
        [
            Option("keep", (("method", "keep"),), 100),
            Option("share", share, 10),
            Option("share hot", (*share, ("hot_rows", "auto")), 10, refines=share),
        ]
    ]
    costs = {(0, 0): 0.0, (0, 1): 0.5}
    choice, _ = solve_measured(items, costs, 50)
    assert choice == [1]
    assert refinements(items, choice) == [(0, 2)]
    costs[(0, 2)] = 0.1
    choice, solution = solve_measured(items, costs, 50)
    assert choice == [2] and solution.loss == pytest.approx(0.1)
    assert refinements(items, [0]) == []


# --------------------------------------------------------------------------------------------
# options: bytes equal the plan's, a sensitivity equal to the compressed model's own


def finetune_if_needed(recipe: Recipe) -> Recipe:
    from dataclasses import replace

    return replace(recipe, finetune=TrainConfig()) if recipe.needs_finetune else recipe


def test_every_option_costs_what_the_plan_counts(world):
    job = pipeline.load(world[0])
    spec = job.spec
    for table in spec.tables:
        options = table_options(table)
        labels = [o.label for o in options]
        assert labels[0] == "keep" and "fp16" in labels
        assert any(lbl.startswith("share") for lbl in labels)
        assert any("hot" in lbl for lbl in labels)
        for option in options[1:]:  # keep: a recipe that changes nothing is refused
            plan = make_plan(finetune_if_needed(one_rule_recipe(table, option.config)), spec)
            assert plan.table(table.name).bytes_after == option.nbytes, option.label
        assert options[0].nbytes == table.bytes
    keep, *quantized = mlp_options(spec)
    for option in quantized:
        recipe = Recipe("m", "", (), MLPSettings("ptq", option.keys["bits"]), None)
        plan = make_plan(recipe, spec)
        assert plan.mlp.bytes_after == option.nbytes
    assert keep.nbytes == plan.mlp.bytes_before  # an fp32 checkpoint: kept as it is


def test_measured_cost_is_the_log_loss_of_the_compressed_model(world):
    """The fast path (one table's pooled embeddings swapped into the cached rows) gives the log
    loss the really compressed model (prepare + convert, as the main job) scores on those rows."""
    ckpt, train, valid, _ = world
    job = pipeline.load(ckpt)
    spec = job.spec
    train_ds, valid_ds = pipeline.load_data(job, train, valid)
    rows = valid_ds.slice(0, 700)
    cache = cache_slice(job.module, spec, rows, max_rows=700)
    baseline = baseline_logloss(job.module, cache)
    counts = pipeline.row_counts(train_ds, spec)
    table = spec.tables[2]
    picked = [
        o
        for o in table_options(table)
        if o.label in ("ptq INT2 row l2", "ptq INT4 table", "share 1/16 Z=8 int8", "fp16")
    ]
    assert len(picked) == 4
    costs = measure(job.module, spec, cache, [(table, o) for o in picked], baseline, counts)
    for option, cost in zip(picked, costs, strict=True):
        recipe = finetune_if_needed(one_rule_recipe(table, option.config))
        plan = make_plan(recipe, spec)
        model, _ = prepare_model(job.module, spec, plan, counts)
        model = convert_model(model).eval()
        with torch.no_grad():
            batch = rows.to_batch(spec.feature_names)
            logits = model(batch.dense, batch.sparse).reshape(-1).double()
            true = F.binary_cross_entropy_with_logits(logits, batch.labels.double()).item()
        reference = mean_logloss(job.module.eval(), cache)
        assert reference == pytest.approx(baseline)
        assert cost == pytest.approx(true - baseline, abs=2e-6), option.label
    assert max(abs(c) for c in costs) > 1e-6  # the options do change the model


def test_the_mlp_cost_is_the_quantized_models(world):
    ckpt, _, valid, _ = world
    job = pipeline.load(ckpt)
    spec = job.spec
    rows = pipeline.load_data(job, valid, None)[0].slice(0, 500)
    cache = cache_slice(job.module, spec, rows, max_rows=500)
    baseline = baseline_logloss(job.module, cache)
    int4 = next(o for o in mlp_options(spec) if o.keys.get("bits") == 4)
    (cost,) = measure(job.module, spec, cache, [(None, int4)], baseline)
    plan = make_plan(Recipe("m", "", (), MLPSettings("ptq", 4), None), spec)
    model, _ = prepare_model(job.module, spec, plan)
    with torch.no_grad():
        batch = rows.to_batch(spec.feature_names)
        logits = model.eval()(batch.dense, batch.sparse).reshape(-1).double()
        true = F.binary_cross_entropy_with_logits(logits, batch.labels.double()).item()
    assert cost == pytest.approx(true - baseline, abs=2e-6) and cost != 0.0


def test_impossible_and_needless_budgets_name_the_bytes(world):
    job = pipeline.load(world[0])
    items = [table_options(t) for t in job.spec.tables] + [mlp_options(job.spec)]
    limits = check_budget(parse_budget("20x"), job.spec, items)
    assert limits.min_bytes < limits.budget_bytes < limits.model_bytes
    with pytest.raises(BudgetError, match=f"at least {limits.min_bytes:,} bytes"):
        check_budget(parse_budget(limits.min_bytes - 1), job.spec, items)
    assert check_budget(parse_budget(limits.min_bytes), job.spec, items).budget_bytes > 0
    with pytest.raises(BudgetError, match="nothing to compress"):
        check_budget(parse_budget("1GB"), job.spec, items)


def test_budget_recipe_trains_its_quantized_tables_only_when_it_fine_tunes(world):
    spec = pipeline.load(world[0]).spec
    options = {t.name: table_options(t) for t in spec.tables}
    ptq = {
        t.name: next(o for o in options[t.name] if o.label == "ptq INT4 row") for t in spec.tables
    }
    mlp = mlp_options(spec)[1]
    frozen = budget_recipe("b", "", spec, ptq, mlp, None)
    assert frozen.finetune is None and not frozen.needs_finetune
    trained = budget_recipe("b", "", spec, ptq, mlp, TrainConfig(steps=3))
    assert trained.finetune == TrainConfig(steps=3)
    assert all(r.method == "qat" for r in trained.rules) and trained.mlp.method == "qat"
    # the same bytes either way, and the TOML reads back into the same recipe
    assert make_plan(trained, spec).bytes_after == make_plan(frozen, spec).bytes_after
    assert parse_recipe(recipe_to_toml(trained)) == trained


# --------------------------------------------------------------------------------------------
# the recipe key


def test_budget_in_a_recipe_round_trips_and_is_not_a_plan(world):
    text = 'name = "fit"\nbudget = "3MB"\n[finetune]\nsteps = 5\n'
    recipe = parse_recipe(text, "fit.toml")
    assert recipe.budget.nbytes == 3_000_000 and recipe.finetune.steps == 5
    assert parse_recipe(recipe_to_toml(recipe)) == recipe
    assert parse_recipe('name = "n"\nbudget = 4096\n').budget.nbytes == 4096
    spec = pipeline.load(world[0]).spec
    with pytest.raises(RecipeError, match="fit.toml: budget = '3MB'.*--data"):
        make_plan(recipe, spec)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('budget = "3QB"', "fit.toml: budget: budget '3QB': unknown unit"),
        ("budget = 2.5", "fit.toml: budget: a budget is a string"),
        ('budget = "1MB"\n[[tables]]\nmatch = ["*"]\nmethod = "fp16"', "remove [[tables]]"),
        ('budget = "1MB"\n[mlp]\nmethod = "keep"', "remove an [mlp] table"),
        ('budget = "1MB"\n[finetune]\noptimizer = "adam"', "cannot take the sparse"),
    ],
)
def test_bad_budget_recipes(text, says):
    with pytest.raises(RecipeError) as e:
        parse_recipe(f'name = "fit"\n{text}\n', "fit.toml")
    assert says in str(e.value)


# --------------------------------------------------------------------------------------------
# the command line


def test_cli_budget_errors(world, capsys, tmp_path):
    ckpt, train, valid, _ = world
    code, _, err = run(capsys, "--budget", "10B", ckpt, "--data", train, "--out", tmp_path / "o")
    assert code == 2 and "is less than this model can take: at least" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, "--budget", "20x", ckpt, "--out", tmp_path / "o")
    assert code == 2 and "give --data" in err
    code, _, err = run(capsys, "--budget", "20x", "--recipe", "int8_ptq", ckpt, "--data", train)
    assert code == 2 and "not both" in err
    code, _, err = run(capsys, ckpt, "--data", train)
    assert code == 2 and "--budget" in err
    code, _, err = run(capsys, "--budget", "3 parsecs", ckpt, "--data", train)
    assert code == 2 and "--budget: budget '3 parsecs': unknown unit 'parsecs'" in err
    recipe = tmp_path / "b.toml"
    recipe.write_text('name = "b"\nbudget = "20x"\n')
    code, _, err = run(capsys, "plan", "--recipe", recipe, ckpt)
    assert code == 2 and "chosen by measuring them on data" in err


@pytest.mark.slow
def test_budget_run_fits_and_its_recipe_repeats_it(world, capsys, tmp_path):
    ckpt, train, valid, _ = world
    out = tmp_path / "fit"
    code, stdout, err = run(
        capsys, "--budget", "20x", ckpt, "--data", train, "--valid", valid, "--out", out,
        "--steps", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    budget = summary["budget"]
    assert summary["recipe"] == "budget_20x"
    assert budget["budget_bytes"] == summary["bytes_before"] // 20
    assert summary["bytes_after"] == budget["planned_bytes"] == summary["bytes_planned"]
    assert summary["bytes_after"] <= budget["budget_bytes"]
    assert budget["measured_on"]["rows"] > 0 and budget["measured_on"]["slice"].startswith(
        str(valid)
    )
    chosen = {t["name"]: t for t in budget["tables"]}
    assert set(chosen) == {"t_cat_0", "t_cat_1", "t_cat_2", "t_cat_3"}
    assert (
        sum(t["bytes"] for t in budget["tables"]) + budget["mlp"]["bytes"] == summary["bytes_after"]
    )
    assert budget["predicted_logloss_increase"] == pytest.approx(
        sum(t["predicted_logloss_increase"] for t in budget["tables"])
        + budget["mlp"]["predicted_logloss_increase"]
    )
    # every plain option that could fit was measured, no other (but hot rows of a chosen array)
    spec = pipeline.load(ckpt).spec
    items = [table_options(t) for t in spec.tables] + [mlp_options(spec)]
    fits = fitting(items, budget["budget_bytes"])
    for j, t in enumerate(budget["tables"]):
        measured = {o["option"] for o in t["options"]}
        could = {items[j][k].label for jj, k in fits if jj == j}
        plain = {o.label for o in items[j] if o.refines is None}
        assert measured & plain == could & plain and measured <= could
        assert t["option"] in measured
    # the artifacts: recipe.toml listed and hashed, the manifest's budget section
    manifest = json.loads((out / "manifest.json").read_text())
    assert "recipe.toml" in manifest["files"]
    assert manifest["budget"]["planned_bytes"] == summary["bytes_after"]
    assert manifest["bytes"]["tables"] + manifest["bytes"]["dense"] == summary["bytes_after"]
    saved = (out / "recipe.toml").read_text()
    assert saved == manifest["recipe"]["toml"]
    code, _, err = run(capsys, "verify", out)
    assert code == 0, err
    # --recipe recipe.toml repeats the plan: the same method and bytes for every table
    code, stdout, err = run(capsys, "plan", "--recipe", out / "recipe.toml", ckpt, "--json")
    assert code == 0, err
    replan = json.loads(stdout)
    assert replan["bytes_after"] == summary["bytes_after"]
    by_table = {t["name"]: t for t in replan["tables"]}
    for name, t in chosen.items():
        assert by_table[name]["bytes_after"] == t["bytes"]
    assert replan["mlp"]["bytes_after"] == budget["mlp"]["bytes"]
    again = tmp_path / "again"
    code, stdout, err = run(
        capsys, "--recipe", out / "recipe.toml", ckpt, "--data", train, "--valid", valid,
        "--out", again, "--steps", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    repeated = json.loads(stdout)
    assert repeated["budget"] is None and repeated["bytes_after"] == summary["bytes_after"]
    assert repeated["metrics"]["compressed"] == summary["metrics"]["compressed"]
    assert not (again / "recipe.toml").exists()


def test_budget_text_names_the_output_directory(world, tmp_path):
    from compress.cli.job_output import default_out_dir

    recipe = Recipe("budget_3MB", "", (), MLPSettings(), None, "--budget", parse_budget("3MB"))
    assert default_out_dir(Path("/x/model.pt"), recipe) == Path("/x/model.budget_3MB")
