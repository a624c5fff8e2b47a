"""Ctrl-C during fine-tuning leaves no output directory, and --resume ends where an
uninterrupted run ends (same artifacts)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from helpers import SLOW_QAT_RECIPE, cli_command, interruptible, tiny_world


@pytest.mark.slow
def test_ctrl_c_then_resume(tmp_path):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    recipe = tmp_path / "slow.toml"
    recipe.write_text(SLOW_QAT_RECIPE)
    common = ["--recipe", str(recipe), str(ckpt), "--data", str(train), "--valid", str(valid)]
    out, state = tmp_path / "out", tmp_path / ".out.train-state.pt"

    proc = subprocess.Popen(
        cli_command(*common, "--out", str(out)),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().endswith("interrupted")
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert state.exists()

    resumed = subprocess.run(
        cli_command(*common, "--out", str(out), "--resume", "--json"),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["train"]["resumed_from"] > 0
    assert not state.exists()  # removed once the artifacts are written

    straight = subprocess.run(
        cli_command(*common, "--out", str(tmp_path / "straight")), capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr
    files_a = json.loads((out / "manifest.json").read_text())["files"]
    files_b = json.loads((tmp_path / "straight" / "manifest.json").read_text())["files"]
    assert files_a == files_b
