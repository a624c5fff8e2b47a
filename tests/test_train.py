"""The fine-tuning loop: deterministic, keeps the best step, and resume equals uninterrupted."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_world

from compress.data.npz import load_npz
from compress.errors import DqrmError
from compress.io.model import load_model
from compress.train.loop import TrainConfig, batch_stream, bce_loss, fit

CONFIG = TrainConfig(
    steps=12,
    batch_size=256,
    lr_embedding=0.05,
    lr_dense=0.01,
    eval_every=4,
    checkpoint_every=3,
    seed=3,
)


def _setup(tmp_path):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    job = load_model(ckpt)
    return job, load_npz(train), load_npz(valid)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_batches_depend_only_on_seed_and_step(tmp_path):
    _, train, _ = _setup(tmp_path)
    names = train.feature_names
    full = [
        b.labels for _, b in zip(range(30), batch_stream(train, names, 256, 7, 0), strict=False)
    ]
    late = [
        b.labels for _, b in zip(range(10), batch_stream(train, names, 256, 7, 20), strict=False)
    ]
    for a, b in zip(full[20:], late, strict=True):
        assert torch.equal(a, b)


def test_same_seed_same_weights(tmp_path):
    job, train, valid = _setup(tmp_path)
    a, b = load_model(job.checkpoint.path).module, load_model(job.checkpoint.path).module
    fit(a, train, valid, job.spec.feature_names, CONFIG)
    fit(b, train, valid, job.spec.feature_names, CONFIG)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_equals_uninterrupted(tmp_path):
    job, train, valid = _setup(tmp_path)
    names = job.spec.feature_names
    straight = load_model(job.checkpoint.path).module
    r_straight = fit(straight, train, valid, names, CONFIG)

    state = tmp_path / "state.pt"
    first = load_model(job.checkpoint.path).module
    partial = fit(first, train, valid, names, CONFIG, state_path=state, stop_after=7)
    assert partial.steps == 7 and state.exists()
    second = load_model(
        job.checkpoint.path
    ).module  # a fresh process would start from the checkpoint
    r_resumed = fit(second, train, valid, names, CONFIG, state_path=state, resume=True)
    assert r_resumed.resumed_from == 7 and r_resumed.steps == 12
    ws, wr = _weights(straight), _weights(second)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    assert r_resumed.best_step == r_straight.best_step
    assert r_resumed.best_metrics == r_straight.best_metrics


def test_resume_with_other_settings_is_refused(tmp_path):
    job, train, valid = _setup(tmp_path)
    state = tmp_path / "state.pt"
    fit(job.module, train, valid, job.spec.feature_names, CONFIG, state_path=state, stop_after=3)
    other = TrainConfig(**{**CONFIG.__dict__, "lr_dense": 0.5})
    with pytest.raises(DqrmError, match="different settings"):
        fit(job.module, train, valid, job.spec.feature_names, other, state_path=state, resume=True)


def test_keep_best_restores_best_evaluation(tmp_path):
    job, train, valid = _setup(tmp_path)
    fit(
        job.module,
        train,
        valid,
        job.spec.feature_names,
        TrainConfig(epochs=3, batch_size=256, seed=0),
    )
    # gradient ascent on the loss makes every later evaluation worse: step 0 is kept and restored
    config = TrainConfig(
        steps=8, batch_size=256, lr_embedding=0.05, lr_dense=0.05, eval_every=4, seed=0
    )
    before = _weights(job.module)
    result = fit(
        job.module,
        train,
        valid,
        job.spec.feature_names,
        config,
        loss_fn=lambda model, batch: -bce_loss(model, batch),
    )
    assert [e["step"] for e in result.history] == [0, 4, 8]
    assert result.history[0]["metrics"]["auc"] > result.history[-1]["metrics"]["auc"]
    best = max(result.history, key=lambda e: e["metrics"]["auc"])
    assert result.best_step == best["step"] == 0
    after = _weights(job.module)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_divergence_is_a_clear_error(tmp_path):
    job, train, valid = _setup(tmp_path)
    wild = TrainConfig(
        steps=20, batch_size=256, lr_embedding=1e6, lr_dense=1e6, seed=0, optimizer="sgd"
    )
    with pytest.raises(DqrmError, match="diverged"):
        fit(job.module, train, None, job.spec.feature_names, wild)
