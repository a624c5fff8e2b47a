"""Faults leave a clean, resumable state: a kill at any point of replacing ``--out`` leaves the old
or the new directory (and the next run repairs and tidies), SIGTERM cleans up like Ctrl-C, a full
disk is one line with nothing partial left, a second run on the same ``--out`` is refused at its
start, a corrupt training state is one line, and a resumed run's artifacts are byte-identical to an
uninterrupted run's, manifest included."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SLOW_QAT_RECIPE, cli_command, tiny_world

from compress import pipeline
from compress.cli.main import main
from compress.errors import ArtifactError
from compress.train import loop as train_module
from exporters.artifacts import atomic_dir

ROOT = Path(__file__).resolve().parents[1]

QAT_RECIPE = """
name = "qat_small"
[[tables]]
match = ["*"]
method = "qat"
bits = 4
granularity = "row"
[finetune]
steps = {steps}
batch_size = 256
eval_every = {eval_every}
checkpoint_every = {checkpoint_every}
"""


def _qat_recipe(tmp_path: Path, steps=30, eval_every=10, checkpoint_every=5) -> Path:
    path = tmp_path / "qat_small.toml"
    path.write_text(
        QAT_RECIPE.format(steps=steps, eval_every=eval_every, checkpoint_every=checkpoint_every)
    )
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _hidden(parent: Path, name: str) -> list[str]:
    """Names beside ``parent/name`` that belong to it: ``.<name>.*``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


# --------------------------------------------------------------------------------------------
# the swap: a kill at every point leaves a directory the next run can complete

KILL_SCRIPT = r"""
import os, shutil, signal, sys
from pathlib import Path
from exporters.artifacts import atomic_dir

mode, kill_at, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
if mode == "renames":
    atomic_dir.exchange = lambda a, b: False  # as where renameat2 is unavailable
steps = 0


def counted(fn):
    def wrapped(*args, **kwargs):
        global steps
        result = fn(*args, **kwargs)
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped


os.rename = counted(os.rename)
atomic_dir.shutil.rmtree = counted(shutil.rmtree)
if mode == "exchange":
    atomic_dir.exchange = counted(atomic_dir.exchange)
with atomic_dir.staging(out) as stage:
    (stage / "sub").mkdir()
    (stage / "v").write_text("new")
    (stage / "sub" / "b").write_text("2")
    if kill_at == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_dir.swap_in(stage, out)
print("done")
"""

OLD = {"v": b"old", "sub/a": b"1"}
NEW = {"v": b"new", "sub/b": b"2"}


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


@pytest.mark.parametrize(
    "mode,kill_at",
    [("exchange", k) for k in range(3)] + [("renames", k) for k in range(5)],
)
def test_a_kill_anywhere_in_the_swap_leaves_old_or_new(tmp_path, mode, kill_at):
    if mode == "exchange" and atomic_dir._renameat2() is None:
        pytest.skip("renameat2 is not available here")
    out = tmp_path / "out"
    _write_tree(out, OLD)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, mode, str(kill_at), str(out)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
    )
    steps = {"exchange": 2, "renames": 4}[mode]  # exchange, rmtree | 3 renames, rmtree
    if kill_at > steps:  # never killed: the swap completed
        assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    cut_between_renames = mode == "renames" and kill_at == 1
    if cut_between_renames:  # the one moment the fallback has nothing at out
        assert not out.exists() and len(atomic_dir.leftovers(out, "old-")) == 1
    else:
        assert _tree(out) in (OLD, NEW)

    recovery = atomic_dir.recover(out)  # what the next run on out does first

    new_in_place = kill_at >= (1 if mode == "exchange" else 2)
    assert _tree(out) == (NEW if new_in_place else OLD)
    assert (recovery.restored == out) == cut_between_renames
    assert _hidden(tmp_path, "out") == []


def test_the_exchange_swaps_directories_atomically(tmp_path):
    if atomic_dir._renameat2() is None:
        pytest.skip("renameat2 is not available here")
    a, b = tmp_path / "a", tmp_path / "b"
    _write_tree(a, OLD)
    _write_tree(b, NEW)
    assert atomic_dir.exchange(a, b)
    assert _tree(a) == NEW and _tree(b) == OLD


def test_recover_restores_the_layout_left_by_earlier_versions(tmp_path):
    out = tmp_path / "out"
    _write_tree(tmp_path / ".out.old-abc123" / "x", OLD)  # the old code's out -> .old-*/x
    assert atomic_dir.recover(out).restored == out
    assert _tree(out) == OLD and _hidden(tmp_path, "out") == []


def test_recover_leaves_names_it_did_not_make(tmp_path):
    out = tmp_path / "out"
    _write_tree(out, NEW)
    for name in (".out.partial-k2j_9x", ".out.old-abc123"):  # ours: removed
        _write_tree(tmp_path / name, OLD)
    for name in (".out.partial-x.y", ".outer.partial-abc123", ".out2.old-abc123"):  # not ours
        _write_tree(tmp_path / name, OLD)
    atomic_dir.recover(out)
    assert _tree(out) == NEW
    assert _hidden(tmp_path, "out") == [".out.partial-x.y"]
    assert (tmp_path / ".outer.partial-abc123").is_dir() and (
        tmp_path / ".out2.old-abc123"
    ).is_dir()


# --------------------------------------------------------------------------------------------
# the CLI on real artifacts


def _ptq_args(world, out: Path) -> list:
    ckpt, train, valid, _ = world
    return ["--recipe", "int8_ptq", ckpt, "--data", train, "--valid", valid, "--out", out]


def test_next_run_restores_an_output_a_killed_force_run_was_replacing(tmp_path, capsys):
    world = tiny_world(tmp_path)
    out = tmp_path / "out"
    assert run(capsys, *_ptq_args(world, out))[0] == 0
    before = _tree(out)
    proc = subprocess.run(  # a --force run killed between the fallback's two renames
        [sys.executable, "-c", KILL_SCRIPT, "renames", "1", str(out)],
        capture_output=True,
        env=_subprocess_env(),
    )
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    _write_tree(tmp_path / ".out.partial-zz9_ab", OLD)  # another killed run's stage
    _write_tree(tmp_path / ".out2.partial-zz9_ab", OLD)  # another output's: left alone

    code, _, err = run(capsys, *_ptq_args(world, out))

    assert code == 2 and err.splitlines() == [
        f"note: {out}: put back the previous output that a killed run was replacing",
        f"error: {out}: already exists (use --force to replace it, or --out)",
    ]
    assert _tree(out) == before  # the whole previous output is back
    assert _hidden(tmp_path, "out") == []
    assert (tmp_path / ".out2.partial-zz9_ab").is_dir()
    assert run(capsys, "verify", out)[0] == 0


def test_force_replaces_and_tidies(tmp_path, capsys):
    world = tiny_world(tmp_path)
    out = tmp_path / "out"
    manifest = b'{"format": "dqrm-compress-artifacts", "format_version": 3}'
    _write_tree(out, {**OLD, "manifest.json": manifest})  # an (old) artifact directory
    _write_tree(tmp_path / ".out.old-q1w2e3", OLD)  # leftovers of killed runs (out present)
    _write_tree(tmp_path / ".out.partial-q1w2e3", NEW)
    code, _, err = run(capsys, *_ptq_args(world, out), "--force")
    assert code == 0, err
    assert (out / "manifest.json").is_file() and "v" not in _tree(out)
    assert _hidden(tmp_path, "out") == []  # no stage, no old, no lock


# --------------------------------------------------------------------------------------------
# the lock

HOLD_SCRIPT = r"""
import sys, time
from pathlib import Path
from exporters.artifacts import atomic_dir

lock = atomic_dir.output_lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_same_out_is_refused_at_its_start(tmp_path, capsys, monkeypatch):
    world = tiny_world(tmp_path)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=_subprocess_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"

        def no_loading(*args, **kwargs):
            raise AssertionError("the checkpoint was loaded before the lock was checked")

        monkeypatch.setattr(pipeline, "load", no_loading)
        code, out_text, err = run(capsys, *_ptq_args(world, out))
        assert code == 2 and out_text == "" and err.count("\n") == 1
        lock = tmp_path / ".out.lock"
        assert err.startswith(f"error: {lock}: ") and f"(pid {holder.pid})" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.undo()
    code, _, err = run(capsys, *_ptq_args(world, out))  # the holder died: its lock went with it
    assert code == 0, err
    assert _hidden(tmp_path, "out") == []


def test_the_lock_is_reentrant_in_one_process_and_removed_at_the_end(tmp_path):
    out = tmp_path / "sub" / "out"
    first = atomic_dir.output_lock(out)
    second = atomic_dir.output_lock(out)  # save() inside the CLI's hold
    second.release()
    assert (tmp_path / "sub" / ".out.lock").read_text().strip() == str(os.getpid())
    first.release()
    first.release()  # idempotent
    assert not (tmp_path / "sub" / ".out.lock").exists()


# --------------------------------------------------------------------------------------------
# full disk and other OS errors


def _fail_np_save(code: int):
    def save(file, arr, **kwargs):  # an open file, or a path (the parity data)
        if hasattr(file, "write"):
            file.write(b"\x93NUMPY partial")
        else:
            Path(file).write_bytes(b"\x93NUMPY partial")
        raise OSError(code, os.strerror(code))

    return save


def test_full_disk_while_writing_artifacts_is_one_line_and_keeps_the_old_output(
    tmp_path, capsys, monkeypatch
):
    world = tiny_world(tmp_path)
    out = tmp_path / "out"
    assert run(capsys, *_ptq_args(world, out))[0] == 0
    before = _tree(out)
    monkeypatch.setattr(np, "save", _fail_np_save(errno.ENOSPC))
    code, _, err = run(capsys, *_ptq_args(world, out), "--force", "--json")
    assert code == 2 and err == f"error: {out}: no space left on device\n"
    assert _tree(out) == before
    assert _hidden(tmp_path, "out") == []


@pytest.mark.parametrize(
    "code,reason",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only file system"),
        (errno.EDQUOT, "disk quota exceeded"),
    ],
)
def test_os_errors_while_staging_name_the_path(tmp_path, code, reason):
    out = tmp_path / "out"
    with pytest.raises(ArtifactError) as no_name, atomic_dir.staging(out):
        raise OSError(code, os.strerror(code))
    assert str(no_name.value) == f"{out}: {reason}"
    with pytest.raises(ArtifactError) as named, atomic_dir.staging(out) as stage:
        raise OSError(code, os.strerror(code), str(stage / "tables" / "t.npy"))
    assert str(named.value) == f"{out / 'tables' / 't.npy'}: {reason}"
    assert _hidden(tmp_path, "out") == []


def test_an_unwritable_parent_is_one_line(tmp_path):
    parent = tmp_path / "p"
    parent.mkdir()
    (parent / "file").write_text("")
    with pytest.raises(ArtifactError) as e:  # --out under a file: the parent cannot be made
        atomic_dir.output_lock(parent / "file" / "out")
    assert str(e.value).startswith(f"{parent / 'file'}") and "\n" not in str(e.value)


def test_full_disk_while_saving_the_training_state(tmp_path, capsys, monkeypatch):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    recipe = _qat_recipe(tmp_path)
    out, state = tmp_path / "out", tmp_path / ".out.train-state.pt"

    def full(obj, f, **kwargs):
        f.write(b"PK partial state")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    code, _, err = run(
        capsys, "--recipe", recipe, ckpt, "--data", train, "--valid", valid, "--out", out, "--json"
    )
    assert code == 2 and err == f"error: {state}: no space left on device\n"
    assert not out.exists() and _hidden(tmp_path, "out") == []  # no .tmp, no stage, no lock


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
        )
    except OSError:
        return False
    return done.returncode == 0


def test_a_short_numpy_write_on_a_really_full_file_system(tmp_path):
    """``numpy.save`` to a path reports a full disk without errno; still named as such."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "out"
        with pytest.raises(ArtifactError) as e, atomic_dir.staging(out) as stage:
            np.save(stage / "big.npy", np.zeros(100_000), allow_pickle=False)
        assert str(e.value) == f"{out}: no space left on device"
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("recipe", ["int8_ptq", "qat"])
def test_a_really_full_file_system(tmp_path, capsys, recipe):
    """A 64 KiB tmpfs as the output's file system (needs mount rights; skipped elsewhere)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        ckpt, train, valid, _ = tiny_world(tmp_path)
        name = str(_qat_recipe(tmp_path)) if recipe == "qat" else recipe
        out = disk / "out"
        code, _, err = run(
            capsys,
            "--recipe",
            name,
            ckpt,
            "--data",
            train,
            "--valid",
            valid,
            "--out",
            out,
            "--json",
        )
        assert code == 2 and err.count("\n") == 1, err
        named = disk / ".out.train-state.pt" if recipe == "qat" else out
        assert err.startswith(f"error: {named}") and err.endswith(": no space left on device\n")
        assert list(disk.iterdir()) == []  # nothing partial on the full file system
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --------------------------------------------------------------------------------------------
# training state: corrupt files, resume byte-identical


def _corrupt_states(tmp_path: Path) -> dict[str, bytes]:
    import argparse
    import io

    good = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(1000)}, "step": 3}, good)
    refused = io.BytesIO()
    torch.save({"x": argparse.Namespace(a=1)}, refused)  # weights_only refuses the class
    return {
        "truncated": good.getvalue()[: len(good.getvalue()) // 2],
        "garbage": b"not a training state at all",
        "refused": refused.getvalue(),
        "other dict": good.getvalue(),
    }


@pytest.mark.parametrize("kind", ["truncated", "garbage", "refused", "other dict"])
def test_a_corrupt_training_state_is_one_line(tmp_path, capsys, kind):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    recipe = _qat_recipe(tmp_path)
    out, state = tmp_path / "out", tmp_path / ".out.train-state.pt"
    state.write_bytes(_corrupt_states(tmp_path)[kind])
    code, _, err = run(
        capsys,
        *("--recipe", recipe, ckpt, "--data", train, "--valid", valid, "--out", out),
        *("--resume", "--json"),
    )
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {state}: ")
    assert ("not a training state" if kind == "other dict" else "corrupt") in err
    assert not out.exists() and state.exists()  # the user's file is theirs to delete


def test_resumed_artifacts_are_byte_identical_manifest_included(tmp_path, capsys, monkeypatch):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    recipe = _qat_recipe(tmp_path, steps=24, eval_every=8, checkpoint_every=4)
    common = ["--recipe", recipe, ckpt, "--data", train, "--valid", valid]
    out, state = tmp_path / "out", tmp_path / ".out.train-state.pt"
    real_write = train_module.write_state
    saves = []

    def interrupted_after_second_save(st, path):
        real_write(st, path)
        saves.append(st["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # as Ctrl-C right after a save (step 8)

    monkeypatch.setattr(train_module, "write_state", interrupted_after_second_save)
    code, _, err = run(capsys, *common, "--out", out)
    assert code == 130 and err.endswith("interrupted\n") and state.exists()
    assert not out.exists() and _hidden(tmp_path, "out") == [".out.train-state.pt"]
    monkeypatch.undo()

    code, stdout, err = run(capsys, *common, "--out", out, "--resume", "--json")
    assert code == 0, err
    assert json.loads(stdout)["train"]["resumed_from"] == 8  # reported, not in the manifest
    code, _, err = run(capsys, *common, "--out", tmp_path / "straight")
    assert code == 0, err
    resumed, straight = _tree(out), _tree(tmp_path / "straight")
    assert "resumed_from" not in json.loads(resumed["manifest.json"])["train"]
    assert resumed == straight


# --------------------------------------------------------------------------------------------
# SIGTERM


@pytest.mark.slow
def test_sigterm_cleans_up_like_ctrl_c_and_resume_is_byte_identical(tmp_path):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    recipe = tmp_path / "slow.toml"
    recipe.write_text(SLOW_QAT_RECIPE)
    common = ["--recipe", recipe, ckpt, "--data", train, "--valid", valid]
    out, state = tmp_path / "out", tmp_path / ".out.train-state.pt"

    proc = subprocess.Popen(cli_command(*common, "--out", out), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().endswith("terminated") and "Traceback" not in err
    assert not out.exists() and _hidden(tmp_path, "out") == [".out.train-state.pt"]

    resumed = subprocess.run(
        cli_command(*common, "--out", out, "--resume", "--json"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["train"]["resumed_from"] > 0
    straight = subprocess.run(
        cli_command(*common, "--out", tmp_path / "straight"), capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr
    assert _tree(out) == _tree(tmp_path / "straight")  # every file, manifest.json included
    assert _hidden(tmp_path, "out") == []


def test_force_never_deletes_a_directory_holding_inputs_or_other_files(tmp_path):
    """``--force`` onto a directory that is not an artifact directory, or that holds an input,
    is refused and leaves every file in place."""
    from compress.cli.main import main
    from tests.helpers import tiny_world

    ckpt = tiny_world(tmp_path)[0]
    keep = tmp_path / "notes.txt"
    keep.write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["--recipe", "int8_ptq", str(ckpt), "--out", str(tmp_path), "--force"])
    assert rc == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_text("y")
    rc = main(["--recipe", "int8_ptq", str(ckpt), "--out", str(other), "--force"])
    assert rc == 2
    assert (other / "data.bin").read_text() == "y"
