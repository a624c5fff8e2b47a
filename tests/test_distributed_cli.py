"""``dqrm-compress --nproc 2`` and ``torchrun -m compress`` end to end, on two gloo workers: the
``distributed`` report, one JSON document from rank 0, AUC against one process, a worker killed
with SIGKILL (the job stops in seconds with one line and writes nothing), ``--resume`` with another
number of workers, and ``--max-restarts``. Every command runs as a subprocess with a deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.cli.main import main
from tests.helpers import tiny_world

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 300

RECIPE = """
name = "dp_cli"
[[tables]]
match = ["*"]
method = "qat"
bits = 8
[mlp]
method = "qat"
bits = 8
[finetune]
steps = {steps}
batch_size = 256
optimizer = "sgd"
lr_embedding = 0.3
lr_dense = 0.01
eval_every = 50
checkpoint_every = 20
seed = 1
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpcli")
    ckpt, train, valid, _ = tiny_world(root, n=8000)
    for steps in (40, 600):
        (root / f"r{steps}.toml").write_text(RECIPE.format(steps=steps))
    return root, ckpt, train, valid


def command(files, recipe: str, out: Path, *extra: str) -> list[str]:
    root, ckpt, train, valid = files
    return [
        sys.executable,
        "-m",
        "compress",
        "--no-progress",
        "--recipe",
        str(root / recipe),
        str(ckpt),
        "--data",
        str(train),
        "--valid",
        str(valid),
        "--out",
        str(out),
        *extra,
    ]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE, check=False
    )


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def kill_rank_once_state_exists(proc: subprocess.Popen, state: Path, rank: int) -> float:
    """SIGKILL worker ``rank`` of the launcher ``proc`` once the training state is saved; the
    time of the kill."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists():
            for pid in children(proc.pid):
                if rank_of(pid) == rank:
                    os.kill(pid, signal.SIGKILL)
                    return time.monotonic()
        time.sleep(0.05)
    raise AssertionError("the training state never appeared")


@pytest.mark.slow
def test_nproc_2_reports_the_exchange_and_matches_one_process(files, tmp_path):
    one = run(command(files, "r40.toml", tmp_path / "one", "--json"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(command(files, "r40.toml", tmp_path / "two", "--json", "--nproc", "2"))
    assert two.returncode == 0, two.stderr[-2000:]
    report = json.loads(two.stdout)  # one document: rank 0 alone prints
    alone = json.loads(one.stdout)
    assert alone["distributed"] is None
    d = report["distributed"]
    assert (d["world_size"], d["backend"], d["steps"]) == (2, "gloo", 40)
    assert 0 < d["bytes_per_step"] < d["dense_bytes_per_step"]
    assert report["timings"]["communication"] > 0
    auc = report["metrics"]["compressed"]["auc"]
    assert abs(auc - alone["metrics"]["compressed"]["auc"]) < 1e-3
    assert two.stderr.count("error") == 0
    assert main(["verify", str(tmp_path / "two")]) == 0


@pytest.mark.slow
def test_killed_worker_stops_the_job_and_resume_continues_with_one_process(files, tmp_path):
    out = tmp_path / "out"
    state = tmp_path / ".out.train-state.pt"
    proc = subprocess.Popen(
        command(files, "r600.toml", out, "--nproc", "2"),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        killed_at = kill_rank_once_state_exists(proc, state, rank=1)
        _, err = proc.communicate(timeout=DEADLINE)
        stopped_in = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stopped_in < 30
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1, err[-2000:]
    assert "worker rank 1" in errors[0] and "killed by SIGKILL" in errors[0]
    assert "--resume" in errors[0] and str(state) in errors[0]
    assert proc.returncode == 1
    assert not out.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p != state)
    assert leftovers == [], leftovers  # no partial output, no lock, no temporary file
    resumed = run(command(files, "r600.toml", out, "--json", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads(resumed.stdout)
    assert report["train"]["resumed_from"] >= 20 and report["train"]["steps"] == 600
    assert report["distributed"] is None


@pytest.mark.slow
def test_max_restarts_continues_after_a_killed_worker(files, tmp_path):
    out = tmp_path / "out"
    state = tmp_path / ".out.train-state.pt"
    args = command(files, "r600.toml", out, "--json", "--nproc", "2", "--max-restarts", "1")
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        kill_rank_once_state_exists(proc, state, rank=1)
        stdout, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(stdout)
    assert report["distributed"]["restarts"] == 1
    assert report["train"]["resumed_from"] >= 20
    assert out.is_dir() and not state.exists()


@pytest.mark.slow
def test_torchrun_runs_the_same_entry_point(files, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    args = command(files, "r40.toml", tmp_path / "o", "--json")
    logs = ["--log-dir", str(tmp_path / "torchrun-logs")]  # not a directory of its own in /tmp
    done = run([*torchrun, "2", *logs, *args[1:]])
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["distributed"]["world_size"] == 2


def test_nproc_refuses_a_recipe_that_does_not_fine_tune(files, tmp_path, capsys):
    root, ckpt, train, valid = files
    code = main(["--recipe", "int8_ptq", str(ckpt), "--data", str(train), "--nproc", "2"])
    assert code == 2
    assert "does not fine-tune: --nproc has nothing to share" in capsys.readouterr().err


def workers_alive(launcher: int) -> list[int]:
    """Processes started by the launcher ``launcher`` that still run (reparented or not)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"DQRM_LAUNCHER_PID={launcher}".encode() in env:
            alive.append(int(entry.name))
    return alive


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_the_workers_and_keeps_the_state(files, tmp_path):
    out = tmp_path / "out"
    state = tmp_path / ".out.train-state.pt"
    proc = subprocess.Popen(
        command(files, "r600.toml", out, "--nproc", "2"),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "terminated"
    assert "error" not in err
    assert workers_alive(proc.pid) == []
    assert state.exists() and not out.exists()
