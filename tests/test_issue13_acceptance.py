"""Issue 13's acceptance points not covered elsewhere, with two gloo processes on the CPU.

The others are in ``tests/test_distributed_training.py`` (the exact exchange trains the weights of
one process; the INT8 exchange's bytes and replicas; resuming with another number of workers, both
ways; INT8 resume bit-identical), ``tests/test_distributed_cli.py`` (``--nproc 2`` end to end, a
worker killed with SIGKILL: one line within 30 s and nothing written; ``--resume`` with one process;
``--max-restarts``; ``torchrun -m compress``; SIGTERM) and ``tests/test_distributed_exchange.py``
(codes, wire format, shares, per-row against per-table scales). Here:

* **Keep-best across ranks** (one rank decides, all apply): rank 0 evaluates, every rank takes the
  same decisions from its metrics, and rank 0 ends on the best step's weights, which are the single
  process's (table-wise QAT scales refreshed from ``max|W|`` on each rank included).
* **INT8 exchange through the command line**: ``--nproc 2`` with ``embedding_grad_bits = 8`` and
  ``mlp_grad_bits = 8`` sends the INT8 floor's bytes (within 1.2x), a fraction of a dense FP32
  all-reduce, ends within 0.001 AUC of one process, and its artifacts verify.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compress.cli.main import main
from tests.helpers import tiny_world
from tests.test_distributed_training import EXACT_BOUND, max_diff, run, weights

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 300

#: Table-wise QAT (scales refreshed from max|W| every 5 steps on each rank), selection on the
#: validation slice every 5 steps; the learning rates overshoot after the first evaluations, so
#: the best step is not the last one and rank 0 must restore it.
KEEP_BEST_RECIPE = """
name = "dp_keep_best"
[[tables]]
match = ["*"]
method = "qat"
bits = 4
granularity = "table"
scale_refresh = 5
[mlp]
method = "qat"
bits = 8
[finetune]
steps = 30
batch_size = 256
optimizer = "sgd"
lr_embedding = 0.5
lr_dense = 2.0
eval_every = 5
keep_best = true
seed = 5
"""

CLI_RECIPE = """
name = "dp_int8"
[[tables]]
match = ["*"]
method = "qat"
bits = 8
[mlp]
method = "qat"
bits = 8
[finetune]
steps = 40
batch_size = 256
optimizer = "sgd"
lr_embedding = 0.3
lr_dense = 0.01
eval_every = 10
seed = 1
embedding_grad_bits = {bits}
mlp_grad_bits = {bits}
"""


@pytest.fixture(scope="module")
def keep_best_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_keep_best")
    ckpt, train, valid, _ = tiny_world(root, n=8000)
    recipe = root / "keep_best.toml"
    recipe.write_text(KEEP_BEST_RECIPE)
    return ckpt, train, valid, recipe


def _metrics(history: list[dict]) -> list[tuple[int, dict | None]]:
    return [(h["step"], h["metrics"]) for h in history]


def test_keep_best_is_decided_by_rank_0_and_applied_by_every_rank(keep_best_files, tmp_path):
    one = run(1, tmp_path / "one", keep_best_files)
    two = run(2, tmp_path / "two", keep_best_files)
    other = json.loads((tmp_path / "two" / "result-1.json").read_text())
    # the single process kept an earlier step: the restore path is exercised
    assert 0 <= one["best_step"] < one["steps"] == 30
    # every rank took rank 0's decisions: the same best step and the same logged metrics
    assert two["best_step"] == other["best_step"] == one["best_step"]
    assert _metrics(other["history"]) == _metrics(two["history"])
    for mine, theirs in zip(two["history"], one["history"], strict=True):
        assert mine["step"] == theirs["step"]
        for key in ("auc", "logloss"):
            assert mine["metrics"][key] == pytest.approx(theirs["metrics"][key], abs=1e-5)
    # rank 0 ends on the best step's weights, the single process's (scales included)
    alone, first = weights(tmp_path / "one"), weights(tmp_path / "two", 0)
    scales = [k for k in alone if k.endswith(".scale")]
    assert scales and max_diff({k: alone[k] for k in scales}, first) <= EXACT_BOUND
    assert max_diff(alone, first) <= EXACT_BOUND
    # rank 1 kept no copy of the best weights (only rank 0 converts and writes): it ends on the
    # last step's, which differ
    assert max_diff(first, weights(tmp_path / "two", 1)) > 1e-3


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_int8_cli")
    ckpt, train, valid, _ = tiny_world(root, n=8000)
    for bits in (8, 32):
        (root / f"r{bits}.toml").write_text(CLI_RECIPE.format(bits=bits))
    return root, ckpt, train, valid


def _cli(files, recipe: str, out: Path, *extra: str) -> dict:
    root, ckpt, train, valid = files
    args = [sys.executable, "-m", "compress", "--no-progress", "--recipe", str(root / recipe)]
    args += [str(ckpt), "--data", str(train), "--valid", str(valid), "--out", str(out), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*args, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "error" not in done.stderr
    return json.loads(done.stdout)  # one document: rank 0 alone prints


def test_int8_exchange_on_the_command_line_sends_the_floor_and_keeps_the_auc(cli_files, tmp_path):
    alone = _cli(cli_files, "r8.toml", tmp_path / "one")
    exact = _cli(cli_files, "r32.toml", tmp_path / "exact", "--nproc", "2")["distributed"]
    report = _cli(cli_files, "r8.toml", tmp_path / "int8", "--nproc", "2")
    d = report["distributed"]
    assert alone["distributed"] is None
    assert (d["world_size"], d["embedding_grad_bits"], d["mlp_grad_bits"]) == (2, 8, 8)
    # bytes: within 1.2x of the INT8 floor, far below FP32 sparse rows and a dense all-reduce
    assert 1.0 <= d["vs_floor"] <= 1.2
    assert d["rows_per_step"] == exact["rows_per_step"]  # the same rows travel
    dim = 8
    assert d["bytes_by_part"]["embedding"] <= d["rows_per_step"] * (4 + 4 + dim) * 1.05
    assert d["bytes_per_step"] < exact["bytes_per_step"] / 2  # 16 of 36 B a row, 1 of 4 a value
    assert d["dense_over_sent"] > 5
    assert report["timings"]["communication"] > 0
    # quality: within 0.001 AUC of the single process
    auc = report["metrics"]["compressed"]["auc"]
    assert abs(auc - alone["metrics"]["compressed"]["auc"]) < 1e-3
    assert main(["verify", str(tmp_path / "int8")]) == 0
    state = tmp_path / ".int8.train-state.pt"
    assert not state.exists()  # a finished job leaves no training state behind
