"""Hot-row-aware sharing: a share group's most frequent rows kept exact beside its ROBE-Z array
(recipe ``hot_rows = N | "auto"``), served exactly by ONNX Runtime and TorchRec, the split of
least frequency-weighted error, recipe errors, deterministic artifacts."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import tiny_world

from compress import pipeline
from compress.cli.main import main
from compress.data.dataset import Dataset
from compress.data.npz import load_npz
from compress.errors import ArtifactError, RecipeError
from compress.io.model_spec import TableSpec
from compress.methods.apply_plan import embedding_parts
from compress.methods.robe import hot_graph
from compress.methods.robe.hot_prepare import HotSettings, prepare_hot_group
from compress.methods.robe.hot_rows import (
    HotShareOption,
    budget_bytes,
    choose_hot_rows,
    exact_hot_rows,
    max_hot_rows,
    split_budget,
)
from compress.methods.robe.method import RobeMethod, ShareConfig
from compress.methods.robe.module import RobeConfig, RobeEmbeddingBagCollection
from compress.recipe.parse import parse_recipe
from compress.recipe.toml_out import recipe_to_toml
from exporters.artifacts.manifest_integrity import dump_manifest, seal
from exporters.artifacts.read import TableArrays, load_artifacts
from exporters.export import export
from exporters.onnx.lookup import build_gather_model, build_pool_model
from exporters.onnx.parity import ort_session, run_session
from exporters.onnx.spec import TableLookup

DIM = 8

RECIPE = """
name = "robe_test"
[[tables]]
match = ["t_cat_2", "t_cat_3"]
method = "share"
compression = 10.0
block_size = 4
array_dtype = "{array}"
hot_rows = {hot}
hot_dtype = "{hot_dtype}"
[finetune]
steps = 8
batch_size = 256
eval_every = 4
"""


def _recipe(tmp_path, hot='"auto"', hot_dtype="int8", array="fp32", name="r.toml"):
    path = tmp_path / name
    text = RECIPE.format(hot=hot, hot_dtype=hot_dtype, array=array)
    path.write_text(text)
    return path


def _robe(model) -> RobeEmbeddingBagCollection:
    (robe,) = [p for p in embedding_parts(model) if isinstance(p, RobeEmbeddingBagCollection)]
    return robe


# ------------------------------------------------------------------ ONNX Runtime serves them exactly


def _module(hot_dtype: str, rows=(300, 90_000), hot=(0, 5, 299, 300, 301, 70_000, 90_299)):
    """A two-table group (second table past the dense-remap limit) with hot rows ``hot``."""
    g = torch.Generator().manual_seed(0)
    specs = [TableSpec(f"t{i}", r, DIM, (f"f{i}",)) for i, r in enumerate(rows)]
    module = RobeEmbeddingBagCollection(specs, RobeConfig(array_size=500, block_size=4))
    with torch.no_grad():
        module.weight.copy_(torch.randn(500, generator=g))
    module.set_hot_rows(torch.tensor(hot), torch.randn(len(hot), DIM, generator=g) * 3, hot_dtype)
    return module


def _lookup(module: RobeEmbeddingBagCollection, table: str) -> TableLookup:
    arrays, entry = RobeMethod().group_tables(module)[table]
    t = next(t for t in module.tables if t.name == table)
    stored = TableArrays(table, "robe", t.num_embeddings, DIM, None, t.feature_names, arrays, entry)
    return TableLookup(table, t.feature_names, DIM, RobeMethod().graph_table(stored))


@pytest.mark.parametrize("hot_dtype", ["int8", "fp16"])
@pytest.mark.parametrize("remap_limit", [1 << 16, 0])  # dense remap table / binary search
def test_hot_rows_serve_exactly_in_onnx_runtime(hot_dtype, remap_limit, monkeypatch):
    monkeypatch.setattr(hot_graph, "DENSE_REMAP_MAX_ROWS", remap_limit)
    module = _module(hot_dtype)
    for name, offset in (("t0", 0), ("t1", 300)):
        lookup = _lookup(module, name)
        assert lookup.kind.hot.dense_remap == (remap_limit > 90_299)
        rows = lookup.num_rows
        hot_here = [int(i) - offset for i in module.hot_ids if 0 <= int(i) - offset < rows]
        ids = np.array([*hot_here, 1, 2, rows - 1, *range(0, rows, 97)], dtype=np.int64)
        want = module.lookup_rows(name, torch.from_numpy(ids)).detach().numpy()
        session = ort_session(build_gather_model(lookup), threads=1)
        got = run_session(session, {"ids": ids})["rows"]
        np.testing.assert_array_equal(got, want)  # exact, hot and hashed rows alike
        # the hot rows really come from the hot table, at their stored precision
        slots = np.searchsorted(module.hot_ids.numpy(), np.array(hot_here) + offset)
        stored = module.hot_weight.detach()[slots].clone()
        if hot_dtype == "fp16":
            stored = stored.half().float()
        np.testing.assert_allclose(got[: len(hot_here)], stored.numpy(), atol=0.05)
        # pooled multi-hot bags too
        lengths = np.array([3, 0, len(ids) - 3], dtype=np.int64)
        pooled = run_session(
            ort_session(build_pool_model(lookup), threads=1), {"values": ids, "lengths": lengths}
        )["pooled"]
        np.testing.assert_allclose(pooled[0], want[:3].sum(0), atol=1e-5)
        assert not pooled[1].any()


def _one_hot_batch(spec, feature: str, ids: np.ndarray) -> Dataset:
    """One sample per id of ``feature`` (the others drawn at random), one id per bag."""
    n = len(ids)
    rng = np.random.default_rng(0)
    values = {
        f: rng.integers(0, spec.table_of_feature(f).num_embeddings, n) for f in spec.feature_names
    }
    values[feature] = ids
    return Dataset(
        dense=rng.standard_normal((n, spec.dense_in_features), dtype=np.float32),
        labels=np.zeros(n, np.float32),
        values=values,
        offsets={f: np.arange(n + 1, dtype=np.int64) for f in values},
    )


@pytest.mark.slow
def test_pipeline_export_serves_hot_rows_in_every_runtime(tmp_path):
    from exporters import Predictor, load_torchrec_model

    ckpt, train, valid, _ = tiny_world(tmp_path)
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, _recipe(tmp_path, hot=150, array="int8"))
    (group,) = plan.share_groups
    split = split_budget(group.budget, 150, 7000, DIM, "int8", "int8", 4)
    assert group.hot_rows == 150 and (group.bytes, group.cells) == (split.bytes, split.cells)
    result = pipeline.compress(job, plan, data=train, valid=valid)
    robe = _robe(result.model)
    assert robe.hot_rows == 150 and robe.config.array_size == group.cells
    # the hot rows are the 150 rows of the two tables that --data reads most often
    counts = pipeline.row_counts(load_npz(train), job.spec)
    flat = torch.cat([counts["t_cat_2"], counts["t_cat_3"]])
    assert flat[robe.hot_ids].min() >= torch.sort(flat, descending=True).values[149]

    out = tmp_path / "out"
    manifest = export(result, out).manifest
    (shared,) = manifest["shared_arrays"]
    assert shared["hot"] == {"rows": 150, "dtype": "int8", "dim": DIM, "ids_dtype": "int32"}
    assert shared["bytes"] == group.bytes
    assert manifest["bytes"]["tables"] == plan.embedding_bytes_after
    assert manifest["onnx"]["parity"]["max_abs_diff"]["model"] <= 1e-5
    assert main(["--no-progress", "verify", str(out), "--parity"]) == 0

    # samples whose cat_3 ids are its hot rows (t_cat_3 starts at global row 2000): ONNX Runtime
    # (Predictor) and the TorchRec loader give the PyTorch model's logits
    data = _one_hot_batch(job.spec, "cat_3", (robe.hot_ids[robe.hot_ids >= 2000] - 2000).numpy())
    batch = data.to_batch(job.spec.feature_names)
    want = result.model(batch.dense, batch.sparse).detach().reshape(-1).numpy()
    served = load_torchrec_model(load_artifacts(out))(batch.dense, batch.sparse)
    np.testing.assert_allclose(served.detach().reshape(-1).numpy(), want, atol=1e-5)
    got = np.asarray(Predictor(out).predict(data)).reshape(-1)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------ the split of least weighted error


def _weighted_error(module: RobeEmbeddingBagCollection, tables, counts) -> float:
    """sum count * ||w - w'||^2 over every row, read back through the module (its lookups)."""
    total = 0.0
    for (spec, weight), c in zip(tables, counts, strict=True):
        rows = module.materialize(spec.name)
        total += float(((weight.double() - rows.double()).pow(2).sum(1) * c.double()).sum())
    return total


@pytest.mark.parametrize(("hot_dtype", "array_dtype"), [("int8", "fp32"), ("fp16", "int8")])
def test_auto_split_minimizes_the_weighted_error(hot_dtype, array_dtype):
    g = torch.Generator().manual_seed(5)
    specs = [TableSpec("a", 120, DIM, ("fa",)), TableSpec("b", 80, DIM, ("fb",))]
    tables = [(s, torch.randn(s.num_embeddings, DIM, generator=g)) for s in specs]
    # Zipf-like counts, some rows never read
    counts = [
        (1000.0 / torch.arange(1, s.num_embeddings + 1).double() ** 1.1)
        .floor()[torch.randperm(s.num_embeddings, generator=g)]
        .to(torch.int64)  # fmt: skip
        for s in specs
    ]
    budget = budget_bytes(200 * DIM // 8, array_dtype)
    settings = HotSettings("auto", hot_dtype, budget, array_dtype, 4, weighted=True)
    upper = max_hot_rows(budget, 200, DIM, array_dtype, hot_dtype, 4)
    seen = int(sum(int((c > 0).sum()) for c in counts))
    candidates = exact_hot_rows(budget, 200, DIM, array_dtype, hot_dtype, min(upper, seen))
    assert 4 < len(candidates) <= 64  # brute-forceable: the search evaluates every split
    module, _, choice = prepare_hot_group("g", tables, counts, settings, 1 << 16, sparse=True)
    # brute force: every split that fills the budget, built and read back as the model reads it
    errors = {}
    for n in candidates:
        fixed = replace(settings, hot_rows=n)
        m, _, c = prepare_hot_group("g", tables, counts, fixed, 1 << 16, sparse=True)
        assert c.cells == split_budget(budget, n, 200, DIM, array_dtype, hot_dtype, 4).cells
        errors[n] = _weighted_error(m, tables, counts)
    best = min(errors.values())
    assert errors[choice.hot_rows] <= best * (1 + 1e-9)
    assert choice.hot_rows > 0  # hot rows pay off on skewed counts ...
    assert errors[choice.hot_rows] < errors[0]  # ... against plain ROBE-Z at the same bytes
    assert _weighted_error(module, tables, counts) == pytest.approx(errors[choice.hot_rows])
    total_weight = float(sum(c.sum() for c in counts)) * DIM
    assert choice.weighted_rmse == pytest.approx(math.sqrt(best / total_weight), rel=1e-5)


def test_search_finds_the_minimum_beyond_the_exhaustive_size():
    calls = []

    def error(n):
        calls.append(n)
        return (n - 7_321) ** 2 / 1e6 + 1.0

    candidates = range(0, 200_001, 3)
    best, seen = choose_hot_rows(error, candidates)
    assert abs(best - 7_321) <= 3 and len(calls) == len(set(calls)) <= 48
    assert seen[best] == min(seen.values())
    assert choose_hot_rows(lambda n: 5.0, range(0, 10))[0] == 0  # ties: the fewest hot rows


def test_split_fills_the_budget_and_the_option_api_agrees(tmp_path):
    budget = budget_bytes(16_000, "fp32")
    for n in exact_hot_rows(budget, 1_000_000, 16, "fp32", "int8", 2000)[:50]:
        assert split_budget(budget, n, 1_000_000, 16, "fp32", "int8", 8).bytes == budget
    assert split_budget(budget, 2_665, 1_000_000, 16, "fp32", "int8", 8).cells == 10
    with pytest.raises(ValueError, match="at most 2,665 fit"):
        split_budget(budget, 2_666, 1_000_000, 16, "fp32", "int8", 8)
    option = HotShareOption(10.0, 300, "fp16", block_size=4)
    ckpt, *_ = tiny_world(tmp_path)
    job = pipeline.load(ckpt)
    keys = "\n".join(f"{k} = {json.dumps(v)}" for k, v in option.rule().items())
    path = tmp_path / "o.toml"
    path.write_text(f'name = "o"\n[[tables]]\nmatch = ["t_cat_3"]\n{keys}\n[finetune]\nsteps = 1\n')
    plan = pipeline.plan(job, path)
    assert plan.share_groups[0].bytes == option.bytes(5000, DIM)
    assert plan.table("t_cat_3").bytes_after == option.bytes(5000, DIM)
    assert HotShareOption(10.0).bytes(5000, DIM) == HotShareOption(10.0, 0).bytes(5000, DIM)


# ------------------------------------------------------------------ recipe keys


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('hot_rows = "many"', 'hot_rows must be a non-negative integer or "auto", got "many"'),
        ("hot_rows = -1", 'hot_rows must be a non-negative integer or "auto", got -1'),
        ("hot_rows = 2.5", 'hot_rows must be a non-negative integer or "auto", got 2.5'),
        ('hot_rows = 10\nhot_dtype = "int4"', 'hot_dtype must be one of "int8", "fp16"'),
        ('hot_dtype = "fp16"', "hot_dtype applies only with hot_rows"),
        ('hot_rows = "auto"\nprojection = "mean"', 'needs projection = "frequency"'),
        ("hot_row = 10", "unknown key 'hot_row'; did you mean 'hot_rows'?"),
    ],
)
def test_recipe_key_errors_name_the_file_and_key(tmp_path, lines, message):
    path = tmp_path / "bad.toml"
    path.write_text(
        f'name = "bad"\n[[tables]]\nmatch = ["*"]\nmethod = "share"\ncompression = 10.0\n'
        f"block_size = 4\n{lines}\n[finetune]\nsteps = 1\n"
    )
    with pytest.raises(RecipeError) as e:
        parse_recipe(path.read_text(), str(path))
    assert str(e.value).startswith(f"{path}: tables[0]: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_plan_errors_and_group_agreement(tmp_path, capsys):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    job = pipeline.load(ckpt)
    with pytest.raises(RecipeError, match=r"r\.toml: tables\[0\]: share group 'share0'.*hot_rows: "
                       r"5000 hot rows take .* at most 1,399 fit"):  # fmt: skip
        pipeline.plan(job, _recipe(tmp_path, hot=5000))
    code = main(["--no-progress", "plan", "--recipe", str(tmp_path / "r.toml"), str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "hot_rows" in err
    two = tmp_path / "two.toml"
    two.write_text(
        'name = "two"\n[[tables]]\nmatch = ["t_cat_2"]\nmethod = "share"\ncompression = 10.0\n'
        'block_size = 4\ngroup = "g"\nhot_rows = 10\n[[tables]]\nmatch = ["t_cat_3"]\n'
        'method = "share"\ncompression = 10.0\nblock_size = 4\ngroup = "g"\nhot_rows = 20\n'
        "[finetune]\nsteps = 1\n"
    )
    with pytest.raises(RecipeError, match=r"tables\[1\]: group 'g' has hot_rows 10 in tables\[0\]"):
        pipeline.plan(job, two)
    # a fixed count needs --data to know which rows are hot; "auto" keeps none without it
    plan = pipeline.plan(job, _recipe(tmp_path, hot=100))
    with pytest.raises(RecipeError, match="hot_rows = 100 keeps the rows --data reads most"):
        pipeline.compress(job, plan, valid=valid, steps=1)
    plan = pipeline.plan(job, _recipe(tmp_path))
    result = pipeline.compress(job, plan, valid=valid, steps=1)
    assert _robe(result.model).hot_rows == 0
    assert any("no hot rows were kept" in n for n in result.notes)
    assert result.model is not None and plan.share_groups[0].bytes == plan.share_groups[0].budget


def test_recipe_round_trips_through_toml(tmp_path):
    recipe = parse_recipe(RECIPE.format(hot='"auto"', hot_dtype="fp16", array="fp32"), "x.toml")
    config = recipe.rules[0].config
    assert isinstance(config, ShareConfig) and (config.hot_rows, config.hot_dtype) == (
        "auto",
        "fp16",
    )
    again = parse_recipe(recipe_to_toml(recipe), "y.toml")
    assert again.rules[0].config == config
    plain = parse_recipe(RECIPE.replace('hot_rows = {hot}\nhot_dtype = "{hot_dtype}"\n', "")
                         .format(array="fp32"), "z.toml")  # fmt: skip
    assert "hot_" not in recipe_to_toml(plain)  # recipes without hot rows are written as before


# ------------------------------------------------------------------ training, determinism, checks


@pytest.mark.slow
def test_hot_rows_fine_tune_and_export_deterministically(tmp_path):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    recipe = _recipe(tmp_path)

    def run(out):
        job = pipeline.load(ckpt)
        plan = pipeline.plan(job, recipe)
        result = pipeline.compress(job, plan, data=train, valid=valid)
        return result, export(result, out)

    first, written = run(tmp_path / "a")
    robe = _robe(first.model)
    assert robe.hot_rows > 0
    note = next(n for n in first.notes if "hot rows (chosen by the least" in n)
    assert "frequency-weighted RMSE" in note
    # fine-tuning trained both parts (the array and the hot table)
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, recipe)
    from compress.methods.apply_plan import prepare_model

    counts = pipeline.row_counts(load_npz(train), job.spec)
    _, (group,) = prepare_model(job.module, job.spec, plan, counts)
    assert torch.equal(group.module.hot_ids, robe.hot_ids)
    assert not torch.equal(group.module.hot_weight, robe.hot_weight)
    assert not torch.equal(group.module.weight, robe.weight)
    second, _ = run(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (
        tmp_path / "b" / "manifest.json"
    ).read_bytes()
    for rel in written.manifest["files"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_malformed_hot_entry_is_one_problem(tmp_path):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    job = pipeline.load(ckpt)
    result = pipeline.compress(
        job, pipeline.plan(job, _recipe(tmp_path, hot=64)), data=train, valid=valid, steps=1
    )
    out = tmp_path / "out"
    export(result, out)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    for bad, match in (
        ({"rows": "64"}, "hot.rows: expected a positive integer"),
        ({"dtype": "int4"}, "hot.dtype: expected one of"),
        ({"rows": 65}, r"hot_ids.npy: shape \[64\], expected \[65\]"),
    ):
        broken = json.loads(json.dumps(manifest))
        broken["shared_arrays"][0]["hot"].update(bad)
        path.write_text(dump_manifest(seal(broken)))
        with pytest.raises(ArtifactError, match=match):
            load_artifacts(out)


def test_export_parity_check_reads_hot_rows(tmp_path, monkeypatch):
    from compress.methods.robe import graph
    from exporters.onnx.parity import ParityError

    ckpt, train, valid, _ = tiny_world(tmp_path)
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, _recipe(tmp_path, hot=8))
    result = pipeline.compress(job, plan, data=train, valid=valid, steps=1)
    out = tmp_path / "out"
    export(result, out)
    hot = np.load(out / "shared" / "share0.hot_ids.npy")
    for f, offset in (("cat_2", 0), ("cat_3", 2000)):  # 8 of 7,000 rows, half the parity ids
        ids = np.load(out / "onnx" / "parity" / "one_hot" / f"{f}__values.npy") + offset
        assert np.isin(ids, hot).mean() > 0.3
    # a graph that served hashed rows in place of the hot ones would fail the export
    monkeypatch.setattr(graph, "add_hot_select", lambda request, hot, name, rows, tail: tail)
    with pytest.raises(ParityError):
        export(result, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


@pytest.mark.slow
def test_hot_rows_resume_equals_uninterrupted(tmp_path):
    from compress.methods.apply_plan import prepare_model
    from compress.train.inputs import run_inputs
    from compress.train.loop import fit

    ckpt, train, valid, _ = tiny_world(tmp_path)
    recipe = _recipe(tmp_path, hot=64)
    text = recipe.read_text().replace("eval_every = 4", "eval_every = 4\ncheckpoint_every = 2")
    recipe.write_text(text)
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, recipe)
    straight = pipeline.compress(job, plan, data=train, valid=valid)
    tr, va = load_npz(train), load_npz(valid)
    first, _ = prepare_model(job.module, job.spec, plan, pipeline.row_counts(tr, job.spec))
    state = tmp_path / "state.pt"
    inputs = run_inputs(job.module, job.spec, plan, tr, va, plan.recipe.finetune.seed)
    fit(first, tr, va, job.spec.feature_names, plan.recipe.finetune, state_path=state,
        stop_after=5, inputs=inputs)  # fmt: skip
    resumed = pipeline.compress(
        pipeline.load(ckpt), plan, data=train, valid=valid, state_path=state, resume=True
    )
    assert resumed.train.resumed_from == 5
    a, b = _robe(straight.model), _robe(resumed.model)
    assert torch.equal(a.hot_weight, b.hot_weight) and torch.equal(a.weight, b.weight)
    assert resumed.metrics["compressed"] == straight.metrics["compressed"]
