"""The pieces of data-parallel fine-tuning that need no second process: INT8 gradient codes, the
embedding message, batch shares, the accounting, root causes of failures, replica digests, and the
command line's refusals."""

from __future__ import annotations

import json

import pytest
import torch

from compress.cli.main import main
from compress.recipe.parse import parse_recipe
from compress.recipe.toml_out import recipe_to_toml
from compress.train.distributed.data_parallel import share_bounds
from compress.train.distributed.failures import Failure, describe, read_record, root_cause
from compress.train.distributed.grad_codec import (
    QMAX,
    coalesce,
    dequantize_blocks,
    dequantize_rows,
    quantize_blocks,
    quantize_rows,
    quantize_table,
)
from compress.train.distributed.grad_exchange import sum_rows
from compress.train.distributed.replicas import digest, first_difference, tensor_digest
from compress.train.distributed.wire import SparseLayout
from tests.helpers import tiny_world

RECIPE = """
name = "r"
[[tables]]
match = ["*"]
method = "qat"
bits = 8
[finetune]
steps = 3
batch_size = 64
"""


def test_row_scales_bound_the_error_of_every_row_by_half_its_scale():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, 16, generator=g) * torch.logspace(-6, 2, 50)[:, None]
    values[7] = 0.0
    codes, scales = quantize_rows(values)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert int(codes.abs().max()) == QMAX
    back = dequantize_rows(codes, scales)
    err = (back - values).abs()
    assert torch.all(err <= scales[:, None] / 2 * (1 + 1e-6))
    assert torch.equal(back[7], torch.zeros(16))  # a zero row stays zero (scale 0, no NaN)


def test_per_row_scales_beat_one_scale_per_table_on_rows_of_different_sizes():
    """DQRM's per-table scale rounds small rows to zero; per-row scales keep them."""
    g = torch.Generator().manual_seed(1)
    values = torch.randn(200, 16, generator=g) * torch.logspace(-4, 0, 200)[:, None]
    rows = dequantize_rows(*quantize_rows(values))
    codes, scale = quantize_table(values)
    table = codes.float() * scale
    rel_rows = float((rows - values).norm() / values.norm())
    rel_table = float((table - values).norm() / values.norm())
    assert rel_rows < rel_table / 2
    small = slice(0, 50)  # rows 1e-4..1e-3 of the largest: the table scale zeroes them
    assert float(table[small].abs().sum()) == 0.0 and float(rows[small].abs().sum()) > 0


def test_blocks_round_trip_with_error_below_half_a_step():
    flat = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    codes, scales = quantize_blocks(flat, 256)
    assert codes.shape == (1000,) and scales.shape == (4,)
    back = dequantize_blocks(codes, scales, 256)
    per_value = scales.repeat_interleave(256)[:1000]
    assert torch.all((back - flat).abs() <= per_value / 2 * (1 + 1e-6))


def test_coalesce_sums_repeated_rows_in_order():
    grad = torch.sparse_coo_tensor(
        torch.tensor([[5, 1, 5, 3]]),
        torch.tensor([[1.0, 2], [3, 4], [5, 6], [7, 8]]),
        (9, 2),
        check_invariants=True,
    )
    rows, values = coalesce(grad)
    assert rows.tolist() == [1, 3, 5]
    assert values.tolist() == [[3, 4], [7, 8], [6, 8]]


@pytest.mark.parametrize("bits", [32, 8])
def test_wire_message_round_trips_ids_and_values(bits):
    g = torch.Generator().manual_seed(3)
    blocks = [
        (torch.tensor([0, 4, 9]), torch.randn(3, 4, generator=g)),
        (torch.empty(0, dtype=torch.int64), torch.empty(0, 2)),
        (torch.tensor([2**20, 7, 3]), torch.randn(3, 3, generator=g)),
    ]
    layout = SparseLayout((4, 2, 3), bits)
    message = layout.encode(blocks)
    assert message.dtype == torch.uint8
    counts = [3, 0, 3]
    # a row: 4 B id + (4 B scale + dim codes) at 8 bits, or 4 * dim at 32; blocks padded to 8 B
    per_row = [4 + (4 + d if bits == 8 else 4 * d) for d in (4, 2, 3)]
    assert message.numel() == sum(-(-n * b // 8) * 8 for n, b in zip(counts, per_row, strict=True))
    decoded = layout.decode(message, counts)
    for (ids, values), (i, v) in zip(blocks, decoded, strict=True):
        assert torch.equal(i, ids)
        if bits == 32:
            assert torch.equal(v, values)  # exact: the float32 bits travel as they are
        elif len(values):
            assert torch.allclose(v, values, atol=float(values.abs().max()) / QMAX)


def test_wire_refuses_a_message_of_another_size():
    layout = SparseLayout((4,), 8)
    message = layout.encode([(torch.tensor([1]), torch.ones(1, 4))])
    with pytest.raises(ValueError, match="announced"):
        layout.decode(message, [2])


def test_sum_rows_adds_repeats_in_the_order_given():
    rows = torch.tensor([3, 1, 3])
    values = torch.tensor([[1.0, 1], [2, 2], [0.5, 0.5]])
    unique, summed = sum_rows(rows, values)
    assert unique.tolist() == [1, 3]
    assert summed.tolist() == [[2, 2], [1.5, 1.5]]
    # float addition in order: (1e8 + 1) - 1e8 is 0 in float32, 1 - 1e8 + 1e8 is 0 too, but
    # (1e8 - 1e8) + 1 is 1: the order given is the order added
    big = torch.tensor([[1e8], [-1e8], [1.0]])
    assert sum_rows(torch.tensor([0, 0, 0]), big)[1].item() == 1.0
    assert sum_rows(torch.tensor([0, 0, 0]), big[[0, 2, 1]])[1].item() == 0.0


@pytest.mark.parametrize("batch,world", [(64, 2), (65, 2), (10, 3), (7, 7)])
def test_shares_are_disjoint_and_cover_the_global_batch(batch, world):
    rows = [set(range(*share_bounds(batch, r, world))) for r in range(world)]
    assert all(rows)  # every rank trains on at least one row
    assert set().union(*rows) == set(range(batch))
    assert sum(len(r) for r in rows) == batch


def test_digest_sees_one_changed_bit_and_names_the_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    before = digest(model)
    with torch.no_grad():
        w = model[1].weight.view(-1)
        bits = w.view(torch.int32)
        bits[1] ^= 1  # the last bit of one value
    after = digest(model)
    assert first_difference(model, before, after) == "1.weight"
    assert first_difference(model, after, digest(model)) is None
    a = torch.arange(10, dtype=torch.float32)
    assert tensor_digest(a, chunk=3) == tensor_digest(a, chunk=1 << 20)  # chunking changes nothing


def _failure(rank, code, kind=None, t=1.0, message="m"):
    record = None if kind is None else {"kind": kind, "time": t, "message": message, "exit_code": 2}
    return Failure(rank, 100 + rank, code, record)


def test_root_cause_prefers_the_error_then_the_killed_worker_over_its_consequences():
    killed = _failure(1, -9)
    lost = _failure(0, 1, "worker_lost", t=0.5)
    terminated = _failure(2, 143, "terminated", t=0.1)
    assert root_cause([lost, killed, terminated]) is killed
    error = _failure(3, 2, "error", t=2.0, message="bad line")
    assert root_cause([lost, killed, error]) is error
    rank0 = _failure(0, 2, "error", t=3.0, message="same")
    assert root_cause([error, rank0]) is rank0  # rank 0's own line, as a single process says it


def test_describe_names_the_signal_and_keeps_exit_codes_of_bad_input():
    killed = describe(_failure(1, -9), "")
    assert "rank 1 (pid 101) was killed by SIGKILL" in str(killed) and killed.exit_code == 1
    bad = describe(_failure(1, 2, "error", message="t.npz: no such file"), "")
    assert str(bad) == "rank 1: t.npz: no such file" and bad.exit_code == 2


def test_failure_records_round_trip_through_the_agents_error_file(tmp_path, monkeypatch):
    from compress.train.distributed.failures import write_record

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    write_record("worker_lost", "lost contact", 1, 3)
    record = read_record(json.loads(path.read_text()))
    assert record["kind"] == "worker_lost" and record["rank"] == 3
    assert record["message"] == "lost contact"
    assert read_record({"message": "from torch itself"}) is None


def test_grad_bits_are_recipe_keys_checked_and_written_back():
    recipe = parse_recipe(
        RECIPE.replace("batch_size = 64", "batch_size = 64\nembedding_grad_bits = 8")
    )
    assert recipe.finetune.embedding_grad_bits == 8 and recipe.finetune.mlp_grad_bits is None
    text = recipe_to_toml(recipe)
    assert "embedding_grad_bits = 8" in text and "mlp_grad_bits" not in text
    with pytest.raises(Exception, match="mlp_grad_bits must be one of 8, 32, got 16"):
        parse_recipe(RECIPE + "mlp_grad_bits = 16\n")


def test_cli_refuses_max_restarts_without_workers(tmp_path, capsys):
    ckpt, train, valid, _ = tiny_world(tmp_path, n=400)
    code = main(["--recipe", "int8_qat", str(ckpt), "--data", str(train), "--max-restarts", "2"])
    assert code == 2
    assert "--max-restarts restarts the workers of --nproc N" in capsys.readouterr().err


def test_cli_under_torchrun_refuses_nproc(tmp_path, capsys, monkeypatch):
    ckpt, train, _, _ = tiny_world(tmp_path, n=400)
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "x"),
        ("MASTER_PORT", "1"),
    ):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DQRM_LAUNCHER_PID", raising=False)
    code = main(["--recipe", "int8_qat", str(ckpt), "--data", str(train), "--nproc", "2"])
    assert code == 2
    assert "under torchrun leave it out" in capsys.readouterr().err


def test_cli_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    ckpt, train, valid, _ = tiny_world(tmp_path, n=400)
    args = ["--recipe", "int8_qat", str(ckpt), "--data", str(train), "--steps", "2"]
    code = main([*args, "--device", "cuda", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--device cuda: no CUDA device is visible" in err
    assert not (tmp_path / "o").exists()


def test_replicas_that_do_not_fit_are_refused_before_training(monkeypatch):
    from compress.errors import SettingError
    from compress.train.distributed import capacity

    tables = [torch.nn.Parameter(torch.zeros(1000, 16)), torch.nn.Parameter(torch.zeros(10, 16))]
    assert capacity.state_bytes(tables, "adagrad") == 4 * 16 * 1010
    assert capacity.state_bytes(tables, "rowwise_adagrad") == 4 * 1010
    assert capacity.state_bytes(tables, "sgd") == 0
    monkeypatch.setattr(capacity, "available_bytes", lambda: 100_000)
    capacity.check(tables, "adagrad", 1)  # 64,640 bytes fit
    capacity.check(tables, "sgd", 64)
    with pytest.raises(
        SettingError, match="2 workers on this machine need 126.25 KiB of adagrad state"
    ):
        capacity.check(tables, "adagrad", 2)


def test_stream_shares_are_the_single_process_batches_cut_by_rank(tmp_path):
    """Every rank reads the stream in the same seeded order and keeps its rows of each batch:
    across a pass boundary and from a resumed step, the shares put together are the batch."""
    import numpy as np

    from compress.data.criteo_write import write_criteo_text
    from compress.data.stream import LoaderSettings, open_stream
    from tests.helpers import data_spec

    spec = data_spec({"a": 50, "b": 1000}, 3)
    rng = np.random.default_rng(0)
    n = 3000
    dense = np.column_stack([np.arange(n), rng.integers(0, 9, (n, 2))])
    write_criteo_text(tmp_path / "d.tsv", np.arange(n) % 2, dense, rng.integers(0, 99, (n, 2)))
    settings = LoaderSettings(stream="on", workers=0, block_bytes=2000, shuffle_rows=500)
    data = open_stream(tmp_path / "d.tsv", spec, settings=settings, dense_transform="none")
    names = spec.feature_names

    def rows(share, start=9, count=4):  # steps 9..12: a pass is 11 steps of 256
        with data.train_batches(names, 256, seed=5, start_step=start, share=share) as batches:
            return [next(batches).dense[:, 0].long().tolist() for _ in range(count)]

    whole = rows(None)
    parts = [rows(share_bounds(256, r, 3)) for r in range(3)]
    for step, batch in enumerate(whole):
        assert sum((p[step] for p in parts), []) == batch
    assert len(set(whole[0])) == 256


def test_in_memory_shares_are_the_single_process_batches_cut_by_rank():
    from compress.data.synthetic import SyntheticConfig, generate
    from compress.train.loop import batch_stream

    data = generate(SyntheticConfig(table_sizes=(10, 20), num_samples=1000, seed=2))
    names = tuple(data.feature_names)
    whole = batch_stream(data, names, 96, seed=4, start_step=8)
    parts = [batch_stream(data, names, 96, 4, 8, share_bounds(96, r, 2)) for r in range(2)]
    for _ in range(4):  # a pass is 10 steps: across its end
        batch = next(whole)
        pieces = [next(p) for p in parts]
        assert torch.equal(torch.cat([p.dense for p in pieces]), batch.dense)
        assert torch.equal(torch.cat([p.labels for p in pieces]), batch.labels)


def test_rows_of_one_value_travel_as_float32_even_at_8_bits():
    layout = SparseLayout((1, 4), 8)
    blocks = [
        (torch.tensor([3, 5]), torch.tensor([[0.1], [-7.0]])),
        (torch.tensor([0]), torch.ones(1, 4)),
    ]
    message = layout.encode(blocks)
    assert message.numel() == 8 * 2 + 16  # 2 x (4 B id + 4 B value); one 12 B row padded to 16
    (ids, values), _ = layout.decode(message, [2, 1])
    assert torch.equal(values, blocks[0][1])  # exact


def test_states_saved_before_the_grad_bits_keys_still_resume():
    from dataclasses import asdict

    from compress.train.config import TrainConfig
    from compress.train.loop import same_settings

    now = asdict(TrainConfig(steps=5))
    old = {k: v for k, v in now.items() if k not in ("embedding_grad_bits", "mlp_grad_bits")}
    assert same_settings(old, now)
    assert not same_settings(old, asdict(TrainConfig(steps=5, mlp_grad_bits=8)))
    assert not same_settings({**old, "steps": 6}, now)
