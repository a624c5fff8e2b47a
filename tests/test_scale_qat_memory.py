"""Fine-tuning memory: copy-on-write master weights, the compact distillation teacher, row snapshots.

A trained table of a memory-mapped checkpoint is a private map of the file (only written pages
become memory); whole-table readers take written pages from memory; training states keep only the
rows that differ from the checkpoint; the teacher scores through a copy of the sampled rows. Every
path gives the values of the in-memory one, and the checkpoint file is never written.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from compress import pipeline
from compress.data.npz import save_npz
from compress.data.synthetic import SyntheticConfig, generate
from compress.io import cow_map, pagemap
from compress.io.cow_map import (
    ResidentGuard,
    _overlay_own_pages,
    changed_rows,
    cow_copy,
    cow_map_of,
    prefault,
)
from compress.io.table_stream import copy_rows, row_chunks
from compress.methods.apply_plan import prepare_model
from compress.recipe.parse import parse_recipe
from compress.train import snapshot
from compress.train.distill import sample_inputs, teacher_logits
from compress.train.evaluate import predict_logits
from compress.train.loop import TrainConfig, fit
from tests.helpers import DENSE, make_dlrm

#: two tables big enough (>= 1 MiB) to be mapped from the checkpoint, two small ones copied
ROWS = (30, 500, 20_000, 40_000)
DIM = 16

QAT = """
name = "t"
[[tables]]
match = ["*"]
method = "qat"
bits = 4
granularity = "table"
scale_refresh = 3
[mlp]
method = "qat"
bits = 8
[finetune]
steps = 12
batch_size = 256
optimizer = "sgd"
lr_embedding = 0.3
lr_dense = 0.001
eval_every = 4
checkpoint_every = 5
"""

pytestmark = pytest.mark.skipif(
    pagemap.page_entries(0, 1) is None, reason="needs a readable /proc/self/pagemap"
)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def world(tmp_path):
    data = generate(
        SyntheticConfig(
            table_sizes=ROWS, num_samples=3000, bag_sizes=(1, 2, 1, 1), num_dense=DENSE, seed=0
        )
    )
    train, valid = data.split_tail(0.25)
    model = make_dlrm(rows=ROWS, dim=DIM)
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    save_npz(train, tmp_path / "train.npz")
    save_npz(valid, tmp_path / "valid.npz")
    return ckpt, train, valid, model


def _big_weight(module):
    return module.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_3"].weight


def _prepared(job):
    plan = pipeline.plan(job, parse_recipe(QAT))
    return prepare_model(job.module, job.spec, plan)[0]


def _master(student, name="t_cat_3"):
    return student.sparse_arch.embedding_bag_collection.embedding_bags[name].weight


def test_trained_table_is_a_private_map_and_only_written_rows_diverge(world):
    ckpt, *_ = world
    before = _sha(ckpt)
    job = pipeline.load(ckpt)
    student = _prepared(job)
    master, small = _master(student), _master(student, "t_cat_1")
    cow = cow_map_of(master)
    assert cow is not None and cow.source.private  # a private map of the checkpoint's bytes
    assert cow_map_of(small) is None  # a small table is copied into memory
    original = _big_weight(job.module).detach().clone()
    assert torch.equal(master.detach(), original)
    ids = torch.tensor([5, 17, 39_999, 17])
    with torch.no_grad():
        master[ids] += 1.0
    ids_changed, values = changed_rows(cow, master)
    assert ids_changed.tolist() == [5, 17, 39_999]
    assert torch.equal(values, master.detach()[[5, 17, 39_999]])
    own = pagemap.own_pages(pagemap.page_entries(cow.first_page, cow.pages))
    assert 0 < own.sum() <= 3  # the written pages, not the table
    # every whole-table reader sees the written rows (read from memory), the rest from the file
    read = torch.cat([rows.clone() for _, _, rows in row_chunks(master, 1000)])
    assert torch.equal(read, master.detach()) and not torch.equal(read, original)
    assert torch.equal(copy_rows(master), master.detach())
    assert torch.equal(_big_weight(job.module).detach(), original)  # the teacher is untouched
    del student, master
    assert _sha(ckpt) == before  # the file never is


def test_training_lookups_map_no_file_pages_and_eval_pages_are_released(world):
    ckpt, train, *_ = world
    job = pipeline.load(ckpt)
    student = _prepared(job)
    master = _master(student)
    cow = cow_map_of(master)
    batch = train.take(np.arange(512)).to_batch(job.spec.feature_names)
    student.train()
    student(batch.dense, batch.sparse).sum().backward()
    if cow_map.MADV_POPULATE_WRITE in cow_map._refused:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14)")
    entries = pagemap.page_entries(cow.first_page, cow.pages)
    assert pagemap.own_pages(entries).sum() > 0  # faulted in for writing: the rows train
    assert pagemap.file_pages(entries).sum() == 0  # and no neighbour of them was mapped
    student.eval()
    with torch.no_grad():
        for _ in row_chunks(master.detach().reshape(-1), 1 << 30):
            pass  # nothing is mapped by a chunked read either
        master.detach()[:, 0].sum()  # a read through the map leaves its file pages mapped
    assert pagemap.file_pages(pagemap.page_entries(cow.first_page, cow.pages)).sum() > 0
    values = master.detach().clone()
    guard = ResidentGuard(budget=0)
    guard.mark = 0  # over budget: release
    assert guard.check() > 0
    entries = pagemap.page_entries(cow.first_page, cow.pages)
    assert pagemap.file_pages(entries).sum() == 0 and pagemap.own_pages(entries).sum() > 0
    assert torch.equal(master.detach(), values)  # written rows kept


def test_snapshot_keeps_changed_rows_and_restores_exactly(world):
    ckpt, *_ = world
    job = pipeline.load(ckpt)
    student = _prepared(job)
    master = _master(student)
    with torch.no_grad():
        master[[3, 300]] -= 2.0
    snap = snapshot.take(student, keep=True)
    assert snapshot.has_rows(snap)
    key = next(k for k in snap["rows"] if k.endswith("t_cat_3.weight"))
    assert snap["rows"][key]["ids"].tolist() == [3, 300]
    assert key not in snap["state"]
    wanted = master.detach().clone()
    with torch.no_grad():
        master[[7, 300]] += 5.0  # training goes on
    version = master._version
    snapshot.restore(student, snap)
    assert torch.equal(master.detach(), wanted) and master._version > version
    fresh = _prepared(job)  # a resumed run: the same checkpoint, a new map
    snapshot.restore(fresh, snap)
    assert torch.equal(_master(fresh).detach(), wanted)
    in_memory = _prepared(pipeline.load(make_dlrm(rows=ROWS, dim=DIM)))
    with pytest.raises(ValueError, match="not a copy-on-write table"):
        snapshot.restore(in_memory, snap)


def test_fine_tuning_a_mapped_checkpoint_equals_in_memory_and_resumes(world, tmp_path):
    """Same weights from the copy-on-write masters as from in-memory copies, with keep-best
    restoring a row snapshot; an interrupted run resumes from a state holding changed rows."""
    ckpt, train, valid, model = world
    names = pipeline.load(ckpt).spec.feature_names
    config = TrainConfig(**{**parse_recipe(QAT).finetune.__dict__})
    # settings under which step 0 scores best: the kept weights are restored from a row snapshot
    config = replace(config, lr_embedding=3.0, lr_dense=0.3, select_on="auc")

    def run(source, **kwargs):
        job = pipeline.load(source)
        student = _prepared(job)
        result = fit(student, train, valid, names, config, **kwargs)
        return student, result

    memory, r_memory = run(model)
    assert cow_map_of(_master(memory)) is None
    mapped, r_mapped = run(ckpt)
    assert cow_map_of(_master(mapped)) is not None
    a, b = memory.state_dict(), mapped.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["metrics"] for h in r_memory.history] == [h["metrics"] for h in r_mapped.history]
    assert r_mapped.best_step == 0
    state = tmp_path / "state.pt"
    first, _ = run(ckpt, state_path=state, stop_after=7)
    saved = torch.load(state, weights_only=True)
    assert snapshot.has_rows(saved["model"])
    rows = [v["ids"].numel() for v in saved["model"]["rows"].values()]
    assert 0 < max(rows) < 7 * config.batch_size  # the rows it changed, not the tables
    resumed, _ = run(ckpt, state_path=state, resume=True)
    c = resumed.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_compact_teacher_scores_exactly_like_the_teacher(world):
    ckpt, *_ = world
    job = pipeline.load(ckpt)
    sampled = sample_inputs(job.spec, 4000, seed=3)
    job.module.eval()
    full = predict_logits(lambda b: job.module(b.dense, b.sparse), sampled, job.spec.feature_names)
    job.module.train()
    compact = teacher_logits(job.module, sampled, job.spec.feature_names)
    assert np.array_equal(full, compact)
    assert job.module.training  # its mode is left as it was


def test_cow_copy_refuses_what_is_not_a_mapped_file(world):
    ckpt, *_ = world
    assert cow_copy(torch.zeros(40_000, DIM)) is None  # in memory
    job = pipeline.load(ckpt)
    small = job.module.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_0"].weight
    assert cow_copy(small) is None  # under a MiB: copied


def test_rows_straddling_pages_are_compared_without_mapping_file_pages(tmp_path):
    """96-byte rows cross page boundaries: a trained row faults in both its pages for writing,
    and finding the changed rows reads no untouched neighbour through the map."""
    path = tmp_path / "t.pt"
    torch.save({"w": torch.randn(20_000, 24)}, path)
    mapped = torch.load(path, mmap=True, weights_only=True)["w"]
    table = cow_copy(mapped)
    cow = cow_map_of(table)
    straddling = next(
        r
        for r in range(20_000)
        if (cow.address + r * 96) // pagemap.PAGE != (cow.address + r * 96 + 95) // pagemap.PAGE
    )
    ids = torch.tensor([straddling, 7_777])
    prefault(cow, ids, write=True)
    own = pagemap.own_pages(pagemap.page_entries(cow.first_page, cow.pages))
    assert own.sum() >= 3  # both pages of the straddling row, one or two of the other
    with torch.no_grad():
        table[ids] *= 3.0
    changed, values = changed_rows(cow, table)
    assert changed.tolist() == sorted(ids.tolist())
    assert torch.equal(values, mapped[changed] * 3.0)
    assert pagemap.file_pages(pagemap.page_entries(cow.first_page, cow.pages)).sum() == 0


@pytest.mark.parametrize("at", [0, 1, 4000, pagemap.PAGE - 1])
@pytest.mark.parametrize("n", [10, pagemap.PAGE, 3 * pagemap.PAGE + 17])
def test_overlay_copies_exactly_the_owned_pages(at, n):
    rng = np.random.default_rng(at + n)
    pages = (at % pagemap.PAGE + n - 1) // pagemap.PAGE + 1
    for _ in range(5):
        own = rng.random(pages) < 0.5
        memory = rng.integers(0, 256, n, dtype=np.uint8)
        into = np.zeros(n, dtype=np.uint8)
        _overlay_own_pages(into, memory, own, at)
        page_of = (at % pagemap.PAGE + np.arange(n)) // pagemap.PAGE
        assert np.array_equal(into, np.where(own[page_of], memory, 0))


def test_a_replaced_checkpoint_is_not_compared_against(tmp_path):
    """After the checkpoint is replaced at its path, the changed rows cannot be found from it: a
    snapshot keeps the whole table (read from the map, which still holds the old file)."""
    path = tmp_path / "t.pt"
    torch.save({"w": torch.randn(20_000, 16)}, path)
    table = cow_copy(torch.load(path, mmap=True, weights_only=True)["w"])
    cow = cow_map_of(table)
    with torch.no_grad():
        table[3] = 1.0
    assert changed_rows(cow, table)[0].tolist() == [3]
    expected = table.clone()
    torch.save({"w": torch.zeros(20_000, 16)}, tmp_path / "new.pt")
    (tmp_path / "new.pt").replace(path)
    assert changed_rows(cow, table) is None
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(table, requires_grad=False)
    snap = snapshot.take(module, keep=True)
    assert not snapshot.has_rows(snap) and torch.equal(snap["w"], expected)
