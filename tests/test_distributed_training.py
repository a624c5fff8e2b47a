"""Data-parallel fine-tuning with two gloo processes on the CPU (``tests/distributed_worker.py``):
the exact exchange against one process, the INT8 exchange's bytes and quality, resuming with
another number of workers. Every worker is a subprocess with a deadline, killed if it passes it.

The bound of the exact mode: after 30 SGD steps of QAT fine-tuning, every weight within 1e-5 of
the single process's (measured: 2e-6). The two runs add the same per-sample gradients in another
order (each rank's rows first, then across ranks; matrix products split over the batch), nothing
more; quantization could round a value that lands within that distance of a rounding boundary the
other way, which these steps do not hit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_world

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 240  # seconds for a whole run of workers (a few seconds each when the box is idle)
EXACT_BOUND = 1e-5

RECIPE = """
name = "dp_test"
[[tables]]
match = ["*"]
method = "qat"
bits = 8
granularity = "table"
scale_refresh = 10          # refreshed from max|W| on every rank: replicas must agree
[mlp]
method = "qat"
bits = 8
[finetune]
steps = 30
batch_size = 256
optimizer = "sgd"
lr_embedding = 0.5
lr_dense = 0.05
eval_every = 10
keep_best = false
checkpoint_every = 10
seed = 3
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, out: Path, world_files, **job) -> dict:
    """Run ``world`` workers (1: a plain single process) on ``job``; the rank-0 result."""
    ckpt, train, valid, recipe = world_files
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "checkpoint": str(ckpt),
        "recipe": str(recipe),
        "train": str(train),
        "valid": str(valid),
        "out": str(out),
        **job,
    }
    job_path = out / "job.json"
    job_path.write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        if world > 1:
            env |= {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(job_path)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + DEADLINE
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    assert codes == [0] * world, "\n".join(outputs)[-3000:]
    return json.loads((out / "result-0.json").read_text())


def weights(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"model-{rank}.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    ckpt, train, valid, _ = tiny_world(root, n=8000)
    recipe = root / "dp_test.toml"
    recipe.write_text(RECIPE)
    return ckpt, train, valid, recipe


@pytest.fixture(scope="module")
def single(world_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, run(1, out, world_files)


def test_exact_exchange_trains_the_weights_of_one_process(world_files, single, tmp_path):
    one_out, one = single
    result = run(2, tmp_path, world_files)
    first, second = weights(tmp_path, 0), weights(tmp_path, 1)
    assert all(torch.equal(first[k], second[k]) for k in first)  # replicas bit-identical
    alone = weights(one_out)
    initial = torch.load(world_files[0], weights_only=True)
    assert max_diff(initial, {k: alone[k] for k in initial}) > 1e-2  # training moved the weights
    assert max_diff(alone, first) <= EXACT_BOUND
    losses = [h["loss"] for h in result["history"] if h["loss"] is not None]
    assert losses == pytest.approx([h["loss"] for h in one["history"] if h["loss"]], rel=1e-5)
    d = result["distributed"]
    assert (d["world_size"], d["backend"], d["steps"]) == (2, "gloo", 30)
    assert (d["embedding_grad_bits"], d["mlp_grad_bits"]) == (32, 32)
    dense_values = sum(v.numel() for k, v in first.items() if "_arch" in k and "sparse" not in k)
    assert d["bytes_by_part"]["dense"] == 4 * dense_values  # one float32 all-reduce buffer
    # 32-bit rows: a 4 B id and 8 float32 values each (padded to the longer rank's message)
    assert d["bytes_by_part"]["embedding"] >= d["rows_per_step"] * (4 + 4 * 8)
    assert d["dense_bytes_per_step"] == 4 * (sum(v.numel() for v in initial.values()))


def test_int8_exchange_sends_a_quarter_and_keeps_replicas_identical(world_files, single, tmp_path):
    one_out, one = single
    exact = run(2, tmp_path / "exact", world_files)["distributed"]
    job = {"finetune": {"embedding_grad_bits": 8, "mlp_grad_bits": 8}}
    result = run(2, tmp_path / "int8", world_files, **job)
    first, second = weights(tmp_path / "int8", 0), weights(tmp_path / "int8", 1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    d = result["distributed"]
    assert d["rows_per_step"] == exact["rows_per_step"]  # the same rows travel
    # INT8 rows: 4 B id + 4 B scale + 8 codes, against 4 + 32 bytes at FP32
    assert d["bytes_by_part"]["embedding"] <= exact["bytes_by_part"]["embedding"] * 16 / 36 * 1.01
    assert d["vs_floor"] <= 1.2
    assert d["bytes_per_step"] < exact["bytes_per_step"] / 2
    # quality: the selection metrics follow the exact run's closely, the weights too
    final, reference = result["history"][-1]["metrics"], one["history"][-1]["metrics"]
    assert abs(final["auc"] - reference["auc"]) < 0.01
    assert abs(final["logloss"] - reference["logloss"]) < 0.01
    assert max_diff(weights(one_out), first) < 0.05


def test_resume_with_another_number_of_workers(world_files, single, tmp_path):
    """2 workers stop at step 15 (saved state); 1 process resumes to 30, and the other way round:
    both end at the uninterrupted single process's weights (within the exact bound)."""
    one_out, _ = single
    state = tmp_path / "state.pt"
    run(2, tmp_path / "a", world_files, state=str(state), stop_after=15)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 15 and saved["distributed"]["world_size"] == 2
    result = run(1, tmp_path / "b", world_files, state=str(state), resume=True)
    assert result["resumed_from"] == 15 and result["steps"] == 30
    assert max_diff(weights(one_out), weights(tmp_path / "b")) <= EXACT_BOUND

    state.unlink()
    run(1, tmp_path / "c", world_files, state=str(state), stop_after=15)
    assert "distributed" not in torch.load(state, weights_only=True)  # a single process's state
    result = run(2, tmp_path / "d", world_files, state=str(state), resume=True)
    assert result["resumed_from"] == 15
    assert max_diff(weights(one_out), weights(tmp_path / "d")) <= EXACT_BOUND


def test_int8_resume_with_the_same_workers_is_bit_identical(world_files, tmp_path):
    """Error-feedback residuals of every rank travel with rank 0's state."""
    job = {"finetune": {"embedding_grad_bits": 8, "mlp_grad_bits": 8}}
    run(2, tmp_path / "whole", world_files, **job)
    state = tmp_path / "state.pt"
    run(2, tmp_path / "a", world_files, state=str(state), stop_after=15, **job)
    residuals = torch.load(state, weights_only=True)["distributed"]["residuals"]["per_rank"]
    assert len(residuals) == 2 and not torch.equal(residuals[0], residuals[1])
    run(2, tmp_path / "b", world_files, state=str(state), resume=True, **job)
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "b")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
