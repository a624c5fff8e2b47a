"""The command line: JSON contracts, one-line errors with exit code 2, the default command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import make_dlrm, tiny_world

from compress.cli.main import main


def run(capsys, *argv):
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def world(tmp_path):
    return tiny_world(tmp_path)


def test_inspect_json(tmp_path, capsys):
    torch.save(make_dlrm("DLRM_DCN").state_dict(), tmp_path / "c.pt")
    code, out, _ = run(capsys, "inspect", tmp_path / "c.pt", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["model"] == "DLRM_DCN"
    assert {"name", "num_embeddings", "embedding_dim", "bytes"} <= set(doc["tables"][0])
    assert doc["total_bytes"] == doc["embedding_bytes"] + doc["dense_bytes"]
    assert doc["embedding_bytes"] == sum(t["bytes"] for t in doc["tables"])
    code, out, _ = run(capsys, "inspect", tmp_path / "c.pt")
    assert code == 0 and "t_cat_3" in out


def test_eval_json(world, capsys):
    ckpt, _, valid, _ = world
    code, out, _ = run(capsys, "eval", ckpt, "--data", valid, "--json")
    doc = json.loads(out)
    assert code == 0 and {"auc", "logloss", "accuracy", "n"} <= set(doc) and doc["n"] == 1500


def test_user_errors_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    code, out, err = run(capsys, "inspect", tmp_path / "bad.pt")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and str(tmp_path / "bad.pt") in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_recipe_is_one_line(world, tmp_path, capsys):
    ckpt, *_ = world
    (tmp_path / "r.toml").write_text(
        'name = "x"\n[[tables]]\nmatch = ["t_nope_*"]\nmethod = "ptq"\nbits = 8\n'
    )
    code, _, err = run(capsys, "plan", "--recipe", tmp_path / "r.toml", ckpt)
    assert code == 2 and "t_nope_*" in err and "t_cat_0" in err and err.count("\n") == 1


def test_plan_and_recipes_json(world, capsys):
    ckpt, *_ = world
    code, out, _ = run(capsys, "plan", "--recipe", "int4_qat", ckpt, "--json")
    doc = json.loads(out)
    assert code == 0 and {"tables", "bytes_before", "bytes_after", "ratio"} <= set(doc)
    assert {"name", "method", "bits", "granularity", "bytes_before", "bytes_after"} <= set(
        doc["tables"][0]
    )
    code, out, _ = run(capsys, "recipes", "--json")
    names = {r["name"] for r in json.loads(out)["recipes"]}
    assert {"int8_ptq", "int4_ptq", "int8_qat", "int4_qat"} <= names


def test_main_command_is_the_default(world, tmp_path, capsys):
    ckpt, train, valid, _ = world
    out_dir = tmp_path / "out"
    code, out, _ = run(
        capsys,
        "--recipe",
        "int4_qat",
        ckpt,
        "--data",
        train,
        "--valid",
        valid,
        "--steps",
        "4",
        "--out",
        out_dir,
        "--json",
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["out"] == str(out_dir) and (out_dir / "manifest.json").exists()
    assert doc["bytes_after"] == doc["bytes_planned"] < doc["bytes_before"]
    for key in ("baseline", "compressed"):
        assert {"auc", "logloss", "accuracy"} <= set(doc["metrics"][key])
    code, _, err = run(capsys, "--recipe", "int4_qat", ckpt, "--out", out_dir)
    assert code == 2 and "already exists" in err


def test_console_script_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "compress", "inspect", "/no/such.pt"], capture_output=True, text=True
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "error: /no/such.pt: no such file or directory"
    )
