"""Planning from a model config alone (``plan --recipe R --model-config FILE|NAME``, no checkpoint).

The shipped configs (``recipes/models``) are the papers' models and the MLPerf DLRM-DCNv2; a plan
from a config equals the plan from a checkpoint of the same shapes, allocates nothing, and a
config that misses or misspells a key is a one-line error naming the file and the key.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import tracemalloc
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from helpers import DENSE, make_dlrm, make_ebc
from test_plan import KAGGLE, KAGGLE_DENSE_FP32, KAGGLE_EMB_FP32
from torchrec.models.dlrm import DLRM_DCN

from compress.cli.main import main
from compress.errors import ModelConfigError
from compress.io.dlrm_classes import known_classes, strategy_for
from compress.io.model import read_spec
from compress.io.model_config import (
    MODEL_KEYS,
    builtin_model_names,
    builtin_models_dir,
    full_model_config,
    load_model_config,
    read_config_spec,
    spec_from_model_config,
)
from compress.io.model_spec import DLRMSpec
from compress.plan import make_plan
from compress.recipe.parse import load_recipe

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ["criteo_kaggle_dlrm", "criteo_terabyte_dlrm", "mlperf_dlrm_dcnv2_criteo_1tb"]
CLASSES = ("DLRM", "DLRM_DCN", "DLRM_Projection")

TERABYTE_ROWS = (
    9980333,
    36084,
    17217,
    7378,
    20134,
    3,
    7112,
    1442,
    61,
    9758201,
    1333352,
    313829,
    10,
    2208,
    11156,
    122,
    4,
    970,
    14,
    9994222,
    7267859,
    9946608,
    415421,
    12420,
    101,
    36,
)  # fmt: skip  (facebookresearch/dlrm, --data-set=terabyte --max-ind-range=10000000)
MLPERF_ROWS = (
    40000000,
    39060,
    17295,
    7424,
    20265,
    3,
    7122,
    1543,
    63,
    40000000,
    3067956,
    405282,
    10,
    2209,
    11938,
    155,
    4,
    976,
    14,
    40000000,
    40000000,
    40000000,
    590152,
    12973,
    108,
    36,
)  # fmt: skip  (mlcommons/training recommendation_v2/torchrec_dlrm, --num_embeddings_per_feature)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def write(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


# --------------------------------------------------------------------------------------------
# The shipped configs


def test_the_shipped_configs_are_listed_and_packaged(capsys) -> None:
    assert builtin_model_names() == BUILTINS
    assert builtin_models_dir() == ROOT / "recipes" / "models"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "models/*.json" in package_data["package-data"]["recipes"]
    code, out, _ = run(capsys, "recipes", "--json")
    assert code == 0 and [m["name"] for m in json.loads(out)["models"]] == BUILTINS
    assert all(m["description"] for m in json.loads(out)["models"])
    code, out, _ = run(capsys, "recipes")
    assert code == 0 and "model configs (--model-config NAME):" in out
    assert all(name in out for name in BUILTINS)
    code, out, _ = run(capsys, "plan", "--help")
    assert code == 0 and all(name in out for name in BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("recipe", ["int4_qat", "int4_rowwise_ptq", "mixed_robe_int4"])
def test_each_shipped_config_plans_without_allocating(name: str, recipe: str) -> None:
    tracemalloc.start()
    try:
        spec = read_config_spec(name)
        plan = make_plan(load_recipe(recipe), spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # shapes only: nothing near a table's size (the smallest is 2 GB)
    assert len(spec.tables) == 26 and spec.feature_names == tuple(f"cat_{i}" for i in range(26))
    assert plan.embedding_bytes_before == spec.embedding_bytes > 2 << 30
    assert plan.bytes_after < plan.bytes_before


def test_kaggle_config_is_the_papers_model() -> None:
    spec = read_config_spec("criteo_kaggle_dlrm")
    assert spec == KAGGLE  # the shapes test_plan derives the paper's byte counts from
    assert spec.embedding_bytes == KAGGLE_EMB_FP32 and spec.dense_bytes == KAGGLE_DENSE_FP32


def test_terabyte_config() -> None:
    spec = read_config_spec("criteo_terabyte_dlrm")
    assert tuple(t.num_embeddings for t in spec.tables) == TERABYTE_ROWS
    assert {t.embedding_dim for t in spec.tables} == {64}
    assert (spec.model_class, spec.dense_in_features) == ("DLRM", 13)
    assert spec.dense_arch_layer_sizes == (512, 256, 64)
    assert spec.over_arch_layer_sizes == (512, 512, 256, 1)
    assert spec.embedding_bytes == 12_576_332_032  # the paper's 12.58 GB


def test_mlperf_dcnv2_config() -> None:
    spec = read_config_spec("mlperf_dlrm_dcnv2_criteo_1tb")
    assert tuple(t.num_embeddings for t in spec.tables) == MLPERF_ROWS
    assert {t.embedding_dim for t in spec.tables} == {128}
    assert spec.model_class == "DLRM_DCN"
    assert (spec.dcn_num_layers, spec.dcn_low_rank_dim) == (3, 512)
    assert spec.dense_arch_layer_sizes == (512, 256, 128)
    assert spec.over_arch_layer_sizes == (1024, 1024, 512, 256, 1)
    assert spec.embedding_bytes == sum(MLPERF_ROWS) * 128 * 4 == 104_542_509_056
    width = 27 * 128  # cross layers over cat(dense, 26 features)
    cross = 3 * (2 * width * 512 + width)
    linears = (
        13 * 512 + 512 * 256 + 256 * 128 + 512 + 256 + 128  # bottom
        + width * 1024 + 1024 * 1024 + 1024 * 512 + 512 * 256 + 256 + 1024 + 1024 + 512 + 256 + 1
    )  # fmt: skip
    assert spec.dense_bytes == (cross + linears) * 4


@pytest.mark.slow
def test_the_100_gb_model_plans_in_a_process_that_cannot_map_it(tmp_path: Path) -> None:
    """The CLI plans the MLPerf model (97 GiB of tables) under an 8 GiB address-space limit: any
    allocation of a table, even one never touched, would fail."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n"
        "import torch\n"
        "try:\n"
        "    torch.empty(16 << 30, dtype=torch.uint8)\n"
        "except RuntimeError:\n"
        "    print('limited', file=sys.stderr)\n"
        "from compress.cli.main import main\n"
        "sys.exit(main(['--no-progress', 'plan', '--recipe', 'int4_qat', '--model-config', "
        "'mlperf_dlrm_dcnv2_criteo_1tb', '--json']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "limited" in done.stderr  # the limit holds: 16 GiB could not even be reserved
    doc = json.loads(done.stdout)
    assert doc["embedding_bytes_before"] == 104_542_509_056
    assert len(doc["tables"]) == 26


# --------------------------------------------------------------------------------------------
# A config plans as the checkpoint of the same shapes


@pytest.mark.parametrize("model_class", CLASSES)
def test_written_config_plans_as_its_checkpoint(model_class: str, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "c.pt"
    torch.save(make_dlrm(model_class).state_dict(), ckpt)
    config = tmp_path / "cfg.json"
    assert run(capsys, "inspect", ckpt, "--write-config", config)[0] == 0
    written = json.loads(config.read_text())
    keys = {k.name for k in strategy_for(model_class).config_keys}
    assert set(written) == set(MODEL_KEYS) | keys  # the whole model: every class key included
    _, from_checkpoint = read_spec(ckpt)
    from_config = read_config_spec(config)
    assert from_config == from_checkpoint
    assert from_config.dense_bytes == from_checkpoint.dense_bytes
    for recipe in ("int4_qat", "int8_ptq", "mixed_int4_int8"):
        for flag in ((), ("--json",)):
            code, with_ckpt, err = run(capsys, "plan", "--recipe", recipe, ckpt, *flag)
            assert code == 0, err
            code, without, err = run(capsys, "plan", "--recipe", recipe, "--model-config", config, *flag)  # fmt: skip
            assert code == 0, err
            assert without == with_ckpt
    # the checkpoint with its full config: today's path, the config checked against it
    code, both, err = run(capsys, "plan", "--recipe", "int4_qat", ckpt, "--model-config", config)
    assert code == 0, err


def test_hand_written_dcn_config_plans_as_the_matching_checkpoint(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = DLRM_DCN(
        embedding_bag_collection=make_ebc(rows=(7, 50, 300, 1000), dim=8),
        dense_in_features=DENSE,
        dense_arch_layer_sizes=[32, 8],
        over_arch_layer_sizes=[16, 4, 1],
        dcn_num_layers=3,
        dcn_low_rank_dim=6,
    )
    torch.save(model.state_dict(), tmp_path / "dcn.pt")
    config = write(
        tmp_path / "dcn.json",
        {
            "model_class": "DLRM_DCN",
            "dense_in_features": DENSE,
            "dense_arch_layer_sizes": [32, 8],
            "over_arch_layer_sizes": [16, 4, 1],
            "dcn_num_layers": 3,
            "dcn_low_rank_dim": 6,
            "tables": [
                {"name": f"t_cat_{i}", "num_embeddings": r, "embedding_dim": 8}
                for i, r in enumerate((7, 50, 300, 1000))
            ],
        },
    )
    code, with_ckpt, err = run(capsys, "plan", "--recipe", "mixed_int4_int8", tmp_path / "dcn.pt", "--json")  # fmt: skip
    assert code == 0, err
    code, without, err = run(capsys, "plan", "--recipe", "mixed_int4_int8", "--model-config", config, "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(without) == json.loads(with_ckpt)
    doc = json.loads(without)
    assert doc["bytes_before"] == sum(p.numel() * 4 for p in model.state_dict().values())


# --------------------------------------------------------------------------------------------
# Class-specific keys come from the class's strategy


@pytest.mark.parametrize("model_class", CLASSES)
def test_class_keys_are_the_strategys(model_class: str, tmp_path: Path) -> None:
    strategy = strategy_for(model_class)
    names = tuple(k.name for k in strategy.config_keys)
    assert names == strategy.interaction_fields
    assert set(names) <= {f.name for f in fields(DLRMSpec)}
    assert all(k.help for k in strategy.config_keys)
    base = full_model_config(read_spec_of(model_class, tmp_path))
    for name in names:  # each is required without a checkpoint, and named when missing
        cfg = {k: v for k, v in base.items() if k != name}
        with pytest.raises(
            ModelConfigError, match=rf"cfg\.json: missing key '{name}' \({model_class}: "
        ):
            read_config_spec(write(tmp_path / "cfg.json", cfg))
    others = [
        k.name for c in known_classes() if c != model_class for k in strategy_for(c).config_keys
    ]
    for name in others:  # another class's key is refused, naming its class
        cfg = {**base, name: 3}
        with pytest.raises(ModelConfigError, match=rf"'{name}' is a DLRM_\w+ key; this config's model_class is {model_class}$"):  # fmt: skip
            load_model_config(write(tmp_path / "cfg.json", cfg))


def read_spec_of(model_class: str, tmp_path: Path) -> DLRMSpec:
    torch.save(make_dlrm(model_class).state_dict(), tmp_path / f"{model_class}.pt")
    return read_spec(tmp_path / f"{model_class}.pt")[1]


def test_a_class_key_without_model_class_is_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.json", {"dcn_num_layers": 2, "tables": [{"name": "t_cat_0"}]})
    with pytest.raises(ModelConfigError, match=r"c\.json: 'dcn_num_layers' is a DLRM_DCN key; set model_class$"):  # fmt: skip
        load_model_config(cfg)


def test_projection_branches_must_end_at_a_multiple_of_the_dim(tmp_path: Path) -> None:
    cfg = full_model_config(read_spec_of("DLRM_Projection", tmp_path))
    cfg["interaction_branch2_layer_sizes"] = [24, 20]  # dim 8
    with pytest.raises(ModelConfigError, match=r"interaction_branch2_layer_sizes ends at 20, not a multiple of the embedding dim 8"):  # fmt: skip
        read_config_spec(write(tmp_path / "p.json", cfg))


# --------------------------------------------------------------------------------------------
# Errors: one line naming the file and the key


@pytest.fixture
def small_config(tmp_path: Path) -> dict:
    return full_model_config(read_spec_of("DLRM_DCN", tmp_path))


@pytest.mark.parametrize(
    "key", ["model_class", "dense_in_features", "dense_arch_layer_sizes", "over_arch_layer_sizes", "tables"]
)  # fmt: skip
def test_a_missing_key_names_the_file_and_the_key(tmp_path, capsys, key) -> None:
    whole = full_model_config(read_spec_of("DLRM", tmp_path))  # no class keys to need a class
    cfg = write(tmp_path / "m.json", {k: v for k, v in whole.items() if k != key})
    code, out, err = run(capsys, "plan", "--recipe", "int4_qat", "--model-config", cfg)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {cfg}: missing key {key!r} (")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("key", ["num_embeddings", "embedding_dim"])
def test_a_table_missing_its_shape_is_named(small_config, tmp_path, capsys, key) -> None:
    del small_config["tables"][2][key]
    cfg = write(tmp_path / "m.json", small_config)
    code, _, err = run(capsys, "plan", "--recipe", "int4_qat", "--model-config", cfg)
    assert code == 2 and err.startswith(f"error: {cfg}: tables[2] (t_cat_2): missing key {key!r}")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("where", "typo", "hint"),
    [
        (None, "dense_arch_layer_size", "did you mean 'dense_arch_layer_sizes'?"),
        (None, "dcn_low_rank", "did you mean 'dcn_low_rank_dim'?"),
        (1, "num_embedding", "did you mean 'num_embeddings'?"),
        (1, "feature_name", "did you mean 'feature_names'?"),
    ],
)
def test_a_misspelt_key_is_named_with_a_suggestion(small_config, tmp_path, capsys, where, typo, hint) -> None:  # fmt: skip
    target = small_config if where is None else small_config["tables"][where]
    target[typo] = target.get(typo.rstrip("s"), 4)
    cfg = write(tmp_path / "t.json", small_config)
    code, _, err = run(capsys, "plan", "--recipe", "int4_qat", "--model-config", cfg)
    table = "" if where is None else f"tables[{where}] (t_cat_{where}): "
    assert code == 2 and err == f"error: {cfg}: {table}unknown key {typo!r}; {hint}\n"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(dense_in_features=0), "dense_in_features must be a positive integer, not 0"),
        (lambda c: c.update(dcn_num_layers=True), "dcn_num_layers must be a positive integer, not True"),
        (lambda c: c.update(over_arch_layer_sizes=[]), "over_arch_layer_sizes must be a non-empty list"),
        (lambda c: c["tables"][0].update(num_embeddings="7"), r"tables\[0\] \(t_cat_0\): num_embeddings must be a positive integer"),
        (lambda c: c["tables"][0].update(name="a.b"), r"tables\[0\]\.name must be a non-empty string without '\.'"),
        (lambda c: c["tables"][1].update(name="t_cat_0"), "table t_cat_0 is listed twice"),
        (lambda c: c["tables"][1].update(feature_names=["cat_0"]), "feature cat_0 is served by tables t_cat_0 and t_cat_1"),
        (lambda c: c["tables"][3].update(embedding_dim=16), r"tables have embedding_dim \[8, 16\]"),
        (lambda c: c.update(dense_arch_layer_sizes=[16, 4]), "dense_arch_layer_sizes ends at 4 but the tables have embedding_dim 8"),
        (lambda c: c.update(model_class="DLRM_Wide"), "model_class must be one of"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_errors(small_config, tmp_path, capsys, edit, message) -> None:
    edit(small_config)
    cfg = write(tmp_path / "v.json", small_config)
    code, _, err = run(capsys, "plan", "--recipe", "int4_qat", "--model-config", cfg)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {cfg}: ")
    assert __import__("re").search(message, err), err


def test_cli_needs_a_checkpoint_or_a_config(tmp_path, capsys) -> None:
    code, out, err = run(capsys, "plan", "--recipe", "int4_qat")
    assert code == 2 and out == "" and "give a CHECKPOINT, or --model-config" in err
    code, _, err = run(
        capsys, "plan", "--recipe", "int4_qat", "--model-config", "criteo_kagle_dlrm"
    )
    assert code == 2 and err == (
        "error: criteo_kagle_dlrm: no such model config file, nor a built-in model config "
        f"({', '.join(BUILTINS)})\n"
    )
    code, _, err = run(
        capsys, "plan", "--recipe", "int4_qat", "--model-config", tmp_path / "no.json"
    )
    assert code == 2 and err == f"error: {tmp_path / 'no.json'}: no such model config\n"
    code, out, err = run(capsys, "plan", "--recipe", "int4_qat", "--model-config", "criteo_kaggle_dlrm", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["embedding_bytes_before"] == KAGGLE_EMB_FP32


def test_a_file_in_the_working_directory_wins_over_a_built_in(tmp_path, monkeypatch, small_config) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "criteo_kaggle_dlrm", small_config)
    assert read_config_spec("criteo_kaggle_dlrm").embedding_dim == 8


# --------------------------------------------------------------------------------------------
# With a checkpoint: the config's shapes are checked against it


@pytest.mark.parametrize(
    ("key", "value", "actual"),
    [
        ("over_arch_layer_sizes", [13, 1], r"\[12, 1\]"),
        ("dense_arch_layer_sizes", [17, 8], r"\[16, 8\]"),
        ("dcn_low_rank_dim", 5, "4"),
        ("dcn_num_layers", 3, "2"),
    ],
)
def test_stated_sizes_are_checked_against_the_checkpoint(small_config, tmp_path, key, value, actual) -> None:  # fmt: skip
    small_config[key] = value
    cfg = write(tmp_path / "s.json", small_config)
    with pytest.raises(
        ModelConfigError, match=rf"s\.json: {key} .* but .*DLRM_DCN\.pt has {actual}$"
    ):
        read_spec(tmp_path / "DLRM_DCN.pt", cfg)


def test_a_built_in_config_checks_a_checkpoint_too(tmp_path) -> None:
    torch.save(make_dlrm().state_dict(), tmp_path / "c.pt")
    with pytest.raises(ModelConfigError, match=r"criteo_kaggle_dlrm\.json: tables disagree with"):
        read_spec(tmp_path / "c.pt", Path("criteo_kaggle_dlrm"))


def test_spec_from_config_needs_the_whole_model() -> None:
    with pytest.raises(ModelConfigError, match=r"^model config: missing key 'model_class'"):
        spec_from_model_config({"tables": [{"name": "t"}]})
