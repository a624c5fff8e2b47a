"""The command line end to end, as a user runs it: ``demo`` on a shrunken demo, ``--force``, the
sidecar model config, a DCP checkpoint through export and the ``Predictor``, and every built-in
recipe on a tiny model whose tables are big enough for each of its rules (plan bytes equal the
bytes of the arrays on disk; ``verify --parity`` passes under ONNX Runtime)."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import DENSE, make_dlrm, tiny_world
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compress.cli.main import main
from compress.data.npz import load_npz, save_npz
from compress.data.synthetic import SyntheticConfig, generate
from exporters.runtime.predictor import Predictor

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
BUILTINS = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
#: Every rule of every built-in recipe matches one of these: < 100, 100..999, 10k..99,999 rows
#: and >= 100k rows (mixed_int4_int8: keep / INT8 / INT4; mixed_robe_int4: keep / INT4 / shared).
RECIPE_ROWS = (50, 500, 12_000, 100_000)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def payload_bytes(root: Path, files) -> int:
    """Bytes of the arrays in ``files`` (paths relative to ``root``), npy headers excluded."""
    return sum(int(np.load(root / f, mmap_mode="r", allow_pickle=False).nbytes) for f in files)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The small checkpoint and data of :func:`helpers.tiny_world`, shared read-only."""
    return tiny_world(tmp_path_factory.mktemp("world"))


# --------------------------------------------------------------------------------------------
# demo


def test_demo_builds_a_shrunken_demo_runs_the_main_job_then_reuses_it(tmp_path, capsys):
    demo = tmp_path / "demo"
    code, out, err = run(capsys, "demo", "--dir", demo, "--samples", 3000, "--json")
    assert code == 0, err
    assert "building the demo" in err
    doc = json.loads(out)
    assert doc["recipe"] == "int4_qat" and doc["out"] == str(demo / "dlrm.int4_qat")
    assert doc["bytes_after"] == doc["bytes_planned"] < doc["bytes_before"]
    assert doc["train"] is not None and doc["metrics"]["compressed"]["n"] > 0
    report = json.loads((demo / "demo.json").read_text())
    assert report["train_samples"] + report["valid_samples"] == 3000
    assert report["table_sizes"] == [20, 300, 2000, 3000, 3000, 3000, 3000]  # cut to 3000 rows
    config = json.loads((demo / "model_config.json").read_text())
    assert [t["num_embeddings"] for t in config["tables"]] == report["table_sizes"]
    assert run(capsys, "verify", demo / "dlrm.int4_qat")[0] == 0
    checkpoint = sha256(demo / "dlrm.pt")

    # a complete demo is reused, and the demo replaces its own earlier output (it runs --force)
    code, out, err = run(capsys, "demo", "--dir", demo, "--json")
    assert code == 0, err
    assert "building the demo" not in err
    assert json.loads(out)["metrics"] == doc["metrics"]  # same model, data and recipe
    assert sha256(demo / "dlrm.pt") == checkpoint
    assert run(capsys, "verify", demo / "dlrm.int4_qat")[0] == 0
    assert sorted(p.name for p in demo.iterdir()) == [
        "demo.json",
        "dlrm.int4_qat",
        "dlrm.pt",
        "model_config.json",
        "train.npz",
        "valid.npz",
    ]  # no stage, old copy, lock or training state left beside the output


def test_demo_samples_below_the_minimum_is_a_usage_error(tmp_path, capsys):
    code, _, err = run(capsys, "demo", "--dir", tmp_path / "d", "--samples", 10)
    assert code == 2 and "--samples" in err
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------------------------
# --force


def test_existing_output_needs_force_which_replaces_it(world, tmp_path, capsys):
    ckpt, train, valid, _ = world
    out = tmp_path / "out"
    args = [ckpt, "--data", train, "--valid", valid, "--out", out]
    assert run(capsys, "--recipe", "int8_ptq", *args)[0] == 0
    first = (out / "manifest.json").read_bytes()

    code, _, err = run(capsys, "--recipe", "int4_ptq", *args)
    assert code == 2
    assert err.strip() == f"error: {out}: already exists (use --force to replace it, or --out)"
    assert (out / "manifest.json").read_bytes() == first  # untouched

    code, out_json, err = run(capsys, "--recipe", "int4_ptq", *args, "--force", "--json")
    assert code == 0, err
    assert json.loads(out_json)["recipe"] == "int4_ptq"
    assert json.loads((out / "manifest.json").read_text())["recipe"]["name"] == "int4_ptq"
    assert run(capsys, "verify", out)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no stage, old copy or lock


# --------------------------------------------------------------------------------------------
# sidecar model config


def _renamed_tables_checkpoint(root: Path) -> tuple[Path, list[str]]:
    """A DLRM whose tables are named so that no feature name can be guessed from them (they serve
    the data's features cat_0..cat_3); returns the checkpoint and the table names."""
    names = ["user_ids", "item_ids", "ad_ids", "query_ids"]  # ("items" would clash in
    # TorchRec's ModuleDict)
    rows = (20, 300, 2000, 5000)  # tiny_world's tables
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=n, embedding_dim=8, num_embeddings=r, feature_names=[f"cat_{i}"]
            )
            for i, (n, r) in enumerate(zip(names, rows, strict=True))
        ]
    )
    torch.manual_seed(3)
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=DENSE,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[12, 1],
    )
    root.mkdir()
    torch.save(model.state_dict(), root / "model.pt")
    return root / "model.pt", names


def test_sidecar_model_config_names_the_features(world, tmp_path, capsys):
    _, train, valid, _ = world
    ckpt, names = _renamed_tables_checkpoint(tmp_path / "ckpt")
    args = ["--recipe", "int4_rowwise_ptq", ckpt, "--data", train, "--valid", valid]

    code, _, err = run(capsys, *args, "--out", tmp_path / "guessed", "--json")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no sparse feature 'user_ids'" in err  # guessed from the table name: not in the data
    assert not (tmp_path / "guessed").exists()

    config = {"tables": [{"name": n, "feature_names": [f"cat_{i}"]} for i, n in enumerate(names)]}
    (tmp_path / "ckpt" / "model_config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, *args, "--out", tmp_path / "sidecar")
    assert code == 0, err
    manifest = json.loads((tmp_path / "sidecar" / "manifest.json").read_text())
    assert manifest["model"]["feature_names"] == [f"cat_{i}" for i in range(4)]
    assert [t["name"] for t in manifest["tables"]] == names
    assert {f: s["table"] for f, s in manifest["inputs"]["sparse"].items()} == {
        f"cat_{i}": n for i, n in enumerate(names)
    }
    metrics = Predictor(tmp_path / "sidecar", threads=1).evaluate(valid)
    assert metrics["n"] == 1500

    # the same file named with --model-config from elsewhere gives the same artifacts
    moved = tmp_path / "elsewhere.json"
    (tmp_path / "ckpt" / "model_config.json").rename(moved)
    code, _, err = run(capsys, *args, "--out", tmp_path / "explicit", "--model-config", moved)
    assert code == 0, err
    files = json.loads((tmp_path / "explicit" / "manifest.json").read_text())["files"]
    assert files == manifest["files"]


# --------------------------------------------------------------------------------------------
# DCP checkpoint -> export -> Predictor


def test_dcp_checkpoint_through_export_and_predictor(world, tmp_path, capsys):
    ckpt, train, valid, model = world
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    common = ["--recipe", "int4_qat", "--data", train, "--valid", valid, "--json"]

    code, out, err = run(capsys, *common, tmp_path / "dcp", "--out", tmp_path / "from_dcp")
    assert code == 0, err
    from_dcp = json.loads(out)
    code, out, err = run(capsys, *common, ckpt, "--out", tmp_path / "from_pt")
    assert code == 0, err
    from_pt = json.loads(out)

    assert from_dcp["metrics"] == from_pt["metrics"]  # fine-tuning read the same weights
    manifests = [
        json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("from_dcp", "from_pt")
    ]
    assert manifests[0]["source"]["checkpoint"] == "dcp"
    # every table, graph and weight, and report_data.json (the weights' sha256 is of the values);
    # report.html names the checkpoint it was made from
    files = [{k: v for k, v in m["files"].items() if k != "report.html"} for m in manifests]
    assert files[0] == files[1] and "report_data.json" in files[0]
    assert run(capsys, "verify", "--parity", tmp_path / "from_dcp")[0] == 0

    served = Predictor(tmp_path / "from_dcp", threads=1)
    data = load_npz(valid)
    logits = served.predict(data)
    assert np.array_equal(logits, Predictor(tmp_path / "from_pt", threads=1).predict(data))
    assert served.evaluate(data)["n"] == len(data) == 1500
    code, out, _ = run(capsys, "eval", tmp_path / "from_dcp", "--data", valid, "--json")
    assert code == 0 and json.loads(out)["auc"] == served.evaluate(data)["auc"]


# --------------------------------------------------------------------------------------------
# every built-in recipe


@pytest.fixture(scope="module")
def recipe_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    data = generate(
        SyntheticConfig(
            table_sizes=RECIPE_ROWS, num_samples=3000, bag_sizes=(1, 2, 1, 1), num_dense=DENSE
        )
    )
    train, valid = data.split_tail(0.25)
    save_npz(train, root / "train.npz")
    save_npz(valid, root / "valid.npz")
    torch.save(make_dlrm(rows=RECIPE_ROWS).state_dict(), root / "model.pt")
    return root


def test_the_builtin_list_is_the_recipes_directory(capsys):
    code, out, _ = run(capsys, "recipes", "--json")
    assert code == 0 and [r["name"] for r in json.loads(out)["recipes"]] == BUILTINS
    assert len(BUILTINS) >= 9


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_recipe_end_to_end(recipe_world, tmp_path, capsys, name):
    root = recipe_world
    ckpt = root / "model.pt"
    rules = tomllib.loads((RECIPES_DIR / f"{name}.toml").read_text())["tables"]

    code, out, err = run(capsys, "plan", "--recipe", name, ckpt, "--json")
    assert code == 0, err
    plan = json.loads(out)
    used = {t["rule"] for t in plan["tables"] if t["rule"] is not None}
    assert used == set(range(len(rules))) and plan["unused_rules"] == []  # every rule acts
    assert plan["bytes_after"] < plan["bytes_before"]

    out_dir = tmp_path / name
    args = ["--recipe", name, ckpt, "--data", root / "train.npz", "--valid", root / "valid.npz"]
    code, out, err = run(capsys, *args, "--out", out_dir, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["bytes_after"] == summary["bytes_planned"] == plan["bytes_after"]
    assert (summary["train"] is not None) == plan["needs_finetune"]

    # plan bytes == bytes of the arrays written, table by table, group by group, and the MLPs
    manifest = json.loads((out_dir / "manifest.json").read_text())
    planned = {t["name"]: t for t in plan["tables"]}
    for table in manifest["tables"]:
        if planned[table["name"]]["method"] != "share":
            on_disk = payload_bytes(out_dir, table["files"].values())
            assert on_disk == planned[table["name"]]["bytes_after"], table["name"]
    groups = {g["name"]: g["bytes"] for g in plan["share_groups"]}
    arrays = {
        a["name"]: payload_bytes(out_dir, a["files"].values()) for a in manifest["shared_arrays"]
    }
    assert arrays == groups
    table_files = [f for t in manifest["tables"] for f in t["files"].values()]
    shared_files = [f for a in manifest["shared_arrays"] for f in a["files"].values()]
    assert payload_bytes(out_dir, table_files + shared_files) == plan["embedding_bytes_after"]
    dense_files = [d["file"] for d in manifest["dense"]]
    assert payload_bytes(out_dir, dense_files) == plan["dense_bytes_after"]

    # ONNX Runtime serves what PyTorch computed: re-run on this host from the stored inputs
    code, out, err = run(capsys, "verify", "--parity", out_dir, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["parity"]["max_abs_diff"] <= report["parity"]["atol"]


# --------------------------------------------------------------------------------------------
# distillation (no --data)


def test_qat_without_data_distils_saves_state_and_writes_artifacts(world, tmp_path, capsys):
    """The distillation path saves resumable state with the run's fingerprints like ``--data``
    runs do (a local name once shadowed the fingerprints with the sampled inputs)."""
    ckpt = world[0]
    out = tmp_path / "distilled"
    code, stdout, err = run(
        capsys, "--recipe", "int4_qat", ckpt, "--steps", "3", "--out", out, "--json"
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["train"] is not None and (out / "manifest.json").is_file()
