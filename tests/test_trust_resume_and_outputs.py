"""Issue 10 review: ``--resume`` continues only the run it was saved from, ``--valid`` is never the
training data, a run's length is bounded, kept failed artifacts say that they failed, and a
symbolic link is never an output directory.

Each test builds its own checkpoint, data and faults, and fails on the code before the fix:
``--resume`` silently continued with another checkpoint, data or recipe; ``--valid`` equal to
``--data`` reported metrics on training rows; ``epochs = 1e300`` started an endless run; artifacts
kept with ``--keep-failed`` read as any others; a symbolic ``--out`` was replaced by a directory
and its link left behind as ``.<out>.partial-*``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dlrm, tiny_world

from compress import pipeline
from compress.cli.main import main
from compress.data.npz import load_npz, save_npz
from compress.data.separation import check_separate_paths
from compress.data.synthetic import SyntheticConfig, generate
from compress.errors import DataError, DqrmError, RecipeError
from compress.io.model import load_model
from compress.recipe.parse import parse_recipe
from compress.train import loop as train_module
from compress.train.config import MAX_EPOCHS, MAX_STEPS, TrainConfig
from compress.train.loop import fit
from exporters.artifacts import atomic_dir
from exporters.artifacts.manifest_integrity import dump_manifest, seal
from exporters.artifacts.manifest_schema import MANIFEST
from exporters.runtime.predictor import Predictor

QAT_RECIPE = """
name = "qat_small"
[[tables]]
match = ["*"]
method = "qat"
bits = 4
granularity = "row"
[finetune]
steps = 24
batch_size = 256
eval_every = 8
checkpoint_every = 4
seed = {seed}
lr_dense = {lr_dense}
"""


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str, exit_code: int = 2) -> str:
    """The single ``error: ...`` line of a failed command (asserting there is only it)."""
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


def _recipe(path: Path, seed: int = 0, lr_dense: float = 0.005) -> Path:
    path.write_text(QAT_RECIPE.format(seed=seed, lr_dense=lr_dense))
    return path


# --------------------------------------------------------------------------------------------
# 1. --resume refuses a state saved with other inputs


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A tiny world and the training state of a QAT run on it that was interrupted after step 8
    (as Ctrl-C right after a save). Returns (directory, state bytes)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    ckpt, train, valid, _ = tiny_world(tmp)
    recipe = _recipe(tmp / "qat_small.toml")
    real_write = train_module.write_state
    saves: list[int] = []

    def interrupted_after_second_save(state, path):
        real_write(state, path)
        saves.append(state["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt

    train_module.write_state = interrupted_after_second_save
    try:
        code = main(
            ["--no-progress", "--recipe", str(recipe), str(ckpt), "--data", str(train)]
            + ["--valid", str(valid), "--out", str(tmp / "out")]
        )
    finally:
        train_module.write_state = real_write
    state = tmp / ".out.train-state.pt"
    assert code == 130 and state.exists() and saves == [4, 8]
    return tmp, state.read_bytes()


def _copy_world(src: Path, dst: Path) -> dict[str, Path]:
    """The interrupted run's inputs copied to ``dst`` (another place: content decides)."""
    names = {"ckpt": "model.pt", "train": "train.npz", "valid": "valid.npz"}
    names["recipe"] = "qat_small.toml"
    paths = {}
    for key, name in names.items():
        shutil.copy(src / name, dst / name)
        paths[key] = dst / name
    return paths


def _other_data(path: Path, seed: int) -> None:
    """Replace the .npz at ``path`` with other rows of the same shape and tables."""
    old = load_npz(path)
    cfg = SyntheticConfig(
        table_sizes=(20, 300, 2000, 5000),
        num_samples=len(old),
        bag_sizes=(1, 2, 1, 1),
        num_dense=old.num_dense,
        seed=seed,
    )
    save_npz(generate(cfg), path)


def _other_checkpoint(path: Path) -> None:
    """The same architecture with other weights (another init seed)."""
    model = make_dlrm("DLRM", seed=7, rows=(20, 300, 2000, 5000))
    torch.save(model.state_dict(), path)


CHANGES = {
    "checkpoint": (lambda p: _other_checkpoint(p["ckpt"]), "the checkpoint changed"),
    "training data": (
        lambda p: _other_data(p["train"], seed=11),
        "the training data (--data) changed",
    ),
    "validation data": (
        lambda p: _other_data(p["valid"], seed=12),
        "the validation data (--valid) changed",
    ),
    "seed": (
        lambda p: _recipe(p["recipe"], seed=5),
        "the recipe's seed changed since it was saved (0 then, 5 now)",
    ),
    "recipe": (lambda p: _recipe(p["recipe"], lr_dense=0.01), "the recipe or its plan changed"),
}


@pytest.mark.parametrize("changed", list(CHANGES))
def test_resume_refuses_a_changed_input_and_names_it(interrupted, tmp_path, capsys, changed):
    src, state_bytes = interrupted
    paths = _copy_world(src, tmp_path)  # the same inputs elsewhere: content decides, not paths
    state = tmp_path / ".out.train-state.pt"
    state.write_bytes(state_bytes)
    change, phrase = CHANGES[changed]
    change(paths)
    argv = [
        *("--recipe", paths["recipe"], paths["ckpt"], "--data", paths["train"]),
        *("--valid", paths["valid"], "--out", tmp_path / "out", "--resume", "--json"),
    ]
    code, _, err = run(capsys, *argv)
    line = one_error_line(code, err)
    assert line.startswith(f"error: {state}: cannot --resume: {phrase}"), line
    assert "run without --resume to start afresh" in line
    assert not (tmp_path / "out").exists() and state.read_bytes() == state_bytes
    _copy_world(src, tmp_path)  # the inputs put back: the run continues where it stopped
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads(stdout)["train"]["resumed_from"] == 8


def test_a_state_without_input_fingerprints_is_refused(interrupted, tmp_path, capsys):
    src, state_bytes = interrupted
    paths = _copy_world(src, tmp_path)
    state = tmp_path / ".out.train-state.pt"
    state.write_bytes(state_bytes)
    saved = torch.load(state, weights_only=True)
    del saved["inputs"]  # as written before fingerprints were recorded
    torch.save(saved, state)
    code, _, err = run(
        capsys,
        *("--recipe", paths["recipe"], paths["ckpt"], "--data", paths["train"]),
        *("--valid", paths["valid"], "--out", tmp_path / "out", "--resume"),
    )
    line = one_error_line(code, err)
    assert "records no fingerprints of its inputs" in line


def test_a_changed_steps_override_names_the_setting(interrupted, tmp_path, capsys):
    src, state_bytes = interrupted
    paths = _copy_world(src, tmp_path)
    (tmp_path / ".out.train-state.pt").write_bytes(state_bytes)
    code, _, err = run(
        capsys,
        *("--recipe", paths["recipe"], paths["ckpt"], "--data", paths["train"]),
        *("--valid", paths["valid"], "--out", tmp_path / "out", "--resume", "--steps", 30),
    )
    line = one_error_line(code, err)
    assert "different settings (steps 24 -> 30)" in line


def test_fit_records_and_checks_the_inputs_it_is_given(tmp_path):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    job = load_model(ckpt)
    data = load_npz(train)
    config = TrainConfig(steps=6, batch_size=256, checkpoint_every=2)
    state = tmp_path / "state.pt"
    inputs = {"checkpoint": "a" * 64, "data": "b" * 64}
    fit(
        job.module,
        data,
        None,
        job.spec.feature_names,
        config,
        state_path=state,
        inputs=inputs,
        stop_after=2,
    )
    assert torch.load(state, weights_only=True)["inputs"] == inputs
    with pytest.raises(DqrmError, match=r"the training data \(--data\) changed"):
        fit(
            job.module,
            data,
            None,
            job.spec.feature_names,
            config,
            state_path=state,
            resume=True,
            inputs={**inputs, "data": "c" * 64},
        )


# --------------------------------------------------------------------------------------------
# 2. --valid may not be --data


@pytest.fixture
def world(tmp_path):
    return tiny_world(tmp_path)


def test_valid_equal_to_data_is_refused(world, tmp_path, capsys):
    ckpt, train, *_ = world
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "-r", "int8_ptq", ckpt, "--data", train, "--valid", train, "--out", out
    )
    line = one_error_line(code, err)
    assert line == (
        f"error: --valid {train}: the same file as --data {train}; reported metrics would be "
        "measured on training rows; give separate validation data, or leave out --valid to hold "
        "out the last 20% of --data"
    )
    assert not out.exists()


@pytest.mark.parametrize("how", ["symlink", "hardlink", "copy"])
def test_valid_that_is_data_under_another_name_is_refused(world, tmp_path, capsys, how):
    ckpt, train, *_ = world
    other = tmp_path / "valid_alias.npz"
    {"symlink": os.symlink, "hardlink": os.link, "copy": shutil.copy}[how](train, other)
    code, _, err = run(
        capsys, "-r", "int8_ptq", ckpt, "--data", train, "--valid", other, "--out", tmp_path / "out"
    )
    line = one_error_line(code, err)
    expected = "identical content" if how == "copy" else f"the same file as --data {train}"
    assert line.startswith(f"error: --valid {other}: ") and expected in line, line


def test_the_python_api_refuses_the_same_rows_as_validation(world):
    ckpt, train, *_ = world
    job = pipeline.load(ckpt)
    data = load_npz(train)
    with pytest.raises(DataError, match="identical content"):
        pipeline.compress(job, pipeline.plan(job, "int8_ptq"), data=data, valid=data)


def _criteo_lines(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        dense = "\t".join(str(int(v)) for v in rng.integers(0, 20, 5))
        sparse = "\t".join(f"{int(v):x}" for v in rng.integers(0, 2**31, 4))
        rows.append(f"{int(rng.integers(0, 2))}\t{dense}\t{sparse}")
    return "\n".join(rows) + "\n"


def test_a_valid_file_inside_a_data_directory_is_refused(tmp_path):
    days = tmp_path / "days"
    days.mkdir()
    for i in range(3):
        (days / f"day_{i}.tsv").write_text(_criteo_lines(20, seed=i))
    with pytest.raises(DataError, match=r"also read by --data .*days"):
        check_separate_paths(days, days / "day_2.tsv")
    with pytest.raises(DataError, match="the same directory as --data"):
        check_separate_paths(days, tmp_path / "days" / ".." / "days")
    elsewhere = tmp_path / "day_9.tsv"
    elsewhere.write_text(_criteo_lines(20, seed=9))
    check_separate_paths(days, elsewhere)  # another file: fine


def _npy_day(directory: Path, day: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    np.save(directory / f"day_{day}_dense.npy", rng.random((8, 5), dtype=np.float32))
    np.save(directory / f"day_{day}_sparse.npy", rng.integers(0, 1000, (8, 4)))
    np.save(directory / f"day_{day}_labels.npy", rng.integers(0, 2, (8, 1)).astype(np.int32))


def test_npy_day_directories_sharing_a_day_file_are_refused(tmp_path):
    train, valid = tmp_path / "train", tmp_path / "valid"
    train.mkdir()
    valid.mkdir()
    for day in (0, 1):
        _npy_day(train, day, seed=day)
    _npy_day(valid, 1, seed=21)
    check_separate_paths(train, valid)  # separate days: fine
    os.remove(valid / "day_1_labels.npy")
    os.symlink(train / "day_1_labels.npy", valid / "day_1_labels.npy")
    with pytest.raises(DataError, match=r"reads .*day_1_labels.npy, which is also read by --data"):
        check_separate_paths(train, valid)


# --------------------------------------------------------------------------------------------
# 3. a run's length is bounded

FINETUNE_HEAD = 'name = "x"\n[[tables]]\nmatch = ["*"]\nmethod = "qat"\nbits = 8\n[finetune]\n'


@pytest.mark.parametrize(
    ("setting", "limit"),
    [
        ("epochs = 1e300", "epochs must be <= 1,000"),
        ("epochs = inf", "epochs must be <= 1,000"),
        ("epochs = 1000.5", "epochs must be <= 1,000"),
        ("epochs = 99999999999999999999", "epochs must be <= 1,000"),
        ("steps = 1000000001", "steps must be <= 1,000,000,000"),
        ("steps = 9223372036854775807", "steps must be <= 1,000,000,000"),
    ],
)
def test_an_absurd_run_length_in_a_recipe_is_one_line(world, tmp_path, capsys, setting, limit):
    ckpt, train, *_ = world
    recipe = tmp_path / "r.toml"
    recipe.write_text(FINETUNE_HEAD + setting + "\n")
    # `plan` reads the recipe and stops: before the fix it accepted the run length and exited 0
    # (the main job started an endless run)
    code, _, err = run(capsys, "plan", "--recipe", recipe, ckpt)
    line = one_error_line(code, err)
    assert line.startswith(f"error: {recipe}: finetune: {limit} (the longest fine-tuning run")
    assert len(line) < 200


def test_the_run_length_limits_themselves_are_accepted():
    recipe = parse_recipe(FINETUNE_HEAD + f"epochs = {MAX_EPOCHS}\n")
    assert recipe.finetune.epochs == MAX_EPOCHS
    recipe = parse_recipe(FINETUNE_HEAD + f"steps = {MAX_STEPS}\n")
    assert recipe.finetune.steps == MAX_STEPS
    with pytest.raises(RecipeError, match="steps must be <= 1,000,000,000"):
        parse_recipe(FINETUNE_HEAD + f"steps = {MAX_STEPS + 1}\n")


def test_steps_on_the_command_line_are_bounded_too(world, tmp_path, capsys):
    ckpt, train, *_ = world
    code, _, err = run(
        capsys,
        "-r",
        "int8_ptq",  # no fine-tuning: before the fix the run ignored --steps and exited 0
        ckpt,
        "--data",
        train,
        "--steps",
        MAX_STEPS + 1,
        "--out",
        tmp_path / "o",
    )
    assert code == 2 and "--steps" in err and "1000000000" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# 4. artifacts kept with --keep-failed say that they failed

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


@pytest.fixture(scope="module")
def failed_artifacts(tmp_path_factory):
    """Artifacts of an INT2 run on a briefly trained model that failed ``--max-auc-drop 0`` and
    were kept with ``--keep-failed``; returns (their directory, the command's stderr)."""
    tmp = tmp_path_factory.mktemp("failed")
    ckpt, train, valid, _ = tiny_world(tmp)
    job = load_model(ckpt)
    config = TrainConfig(epochs=1, batch_size=128, lr_embedding=0.1, lr_dense=0.05)
    fit(job.module, load_npz(train), None, job.spec.feature_names, config)
    trained = tmp / "trained.pt"
    torch.save(job.module.state_dict(), trained)
    (tmp / "int2.toml").write_text(INT2)
    out = tmp / "kept"
    code = main(
        ["--no-progress", "--recipe", str(tmp / "int2.toml"), str(trained), "--valid", str(valid)]
        + ["--out", str(out), "--max-auc-drop", "0", "--keep-failed"]
    )
    assert code == 3 and (out / MANIFEST).exists()
    return out


def test_kept_failed_artifacts_record_the_failed_gate(failed_artifacts):
    manifest = json.loads((failed_artifacts / MANIFEST).read_text())
    gate = manifest["quality_gate"]
    assert gate["max_auc_drop"] == 0 and gate["passed"] is False
    assert gate["failure"].startswith("compressed AUC") and "--max-auc-drop 0" in gate["failure"]


def test_verify_warns_that_the_artifacts_failed_their_gate(failed_artifacts, capsys):
    code, stdout, err = run(capsys, "verify", failed_artifacts)
    assert code == 0 and stdout.startswith("ok:")
    assert "FAILED their quality gate (--max-auc-drop 0): compressed AUC" in err
    code, stdout, _ = run(capsys, "verify", failed_artifacts, "--json")
    assert any("FAILED their quality gate" in w for w in json.loads(stdout)["warnings"])


def test_the_predictor_warns_that_the_artifacts_failed_their_gate(failed_artifacts, caplog):
    with caplog.at_level("WARNING"):
        Predictor(failed_artifacts)
    assert any("FAILED their quality gate" in r.getMessage() for r in caplog.records)


def test_a_passed_gate_is_recorded_without_a_warning(world, tmp_path, capsys):
    ckpt, train, valid, _ = world
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "-r",
        "int8_ptq",
        ckpt,
        "--data",
        train,
        "--valid",
        valid,
        "--out",
        out,
        "--max-auc-drop",
        1,
    )
    assert code == 0, err
    gate = json.loads((out / MANIFEST).read_text())["quality_gate"]
    assert gate == {"max_auc_drop": 1.0, "passed": True, "failure": None}
    code, _, err = run(capsys, "verify", out)
    assert code == 0 and "quality gate" not in err


@pytest.mark.parametrize(
    ("gate", "problem"),
    [
        ({"max_auc_drop": "0.01", "passed": False, "failure": "x"}, "quality_gate.max_auc_drop"),
        ({"max_auc_drop": 0.01, "passed": "no", "failure": "x"}, "quality_gate.passed"),
        ({"max_auc_drop": 0.01, "passed": False, "failure": None}, "a failed gate says why"),
        ("failed", "quality_gate: expected an object"),
    ],
)
def test_a_malformed_gate_record_is_a_verify_problem(
    failed_artifacts, tmp_path, capsys, gate, problem
):
    copy = tmp_path / "copy"
    shutil.copytree(failed_artifacts, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["quality_gate"] = gate
    (copy / MANIFEST).write_text(dump_manifest(seal(manifest)))
    code, _, err = run(capsys, "verify", copy)
    assert code == 2 and problem in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# 5. a symbolic link is never an output directory


@pytest.mark.parametrize("target", ["dangling", "artifacts"])
def test_a_symlinked_out_is_refused_and_nothing_is_left(world, tmp_path, capsys, target):
    ckpt, *_ = world
    real = tmp_path / "real"
    if target == "artifacts":
        assert main(["--no-progress", "-r", "int8_ptq", str(ckpt), "--out", str(real)]) == 0
        capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    link = tmp_path / "link"
    os.symlink(real, link)
    real_tree = sorted(p.name for p in real.rglob("*")) if real.exists() else None
    code, _, err = run(capsys, "-r", "int8_ptq", ckpt, "--out", link, "--force")
    line = one_error_line(code, err)
    assert line == (
        f"error: {link}: a symbolic link (to {real}); the output directory must not be a link: "
        "give its target, or another --out"
    )
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "link"])
    assert (sorted(p.name for p in real.rglob("*")) if real.exists() else None) == real_tree


def test_recovery_removes_a_partial_link_left_by_earlier_versions(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = tmp_path / ".out.partial-abc123_x"
    os.symlink(tmp_path / "elsewhere", stale)  # what the swap left of a symbolic --out
    other = tmp_path / ".other.partial-abc123_x"
    os.symlink(tmp_path / "elsewhere", other)  # not this output's: left alone
    recovery = atomic_dir.recover(out)
    assert stale in recovery.removed and not os.path.lexists(stale)
    assert other.is_symlink() and out.is_dir()
