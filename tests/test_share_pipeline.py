"""Parameter sharing through the main job: projection, fine-tuning, resume, artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_world

from compress import pipeline
from compress.data.npz import load_npz
from compress.errors import ArtifactError, RecipeError
from compress.methods.apply_plan import embedding_parts
from compress.methods.robe.array import ArrayQuantization
from compress.methods.robe.hashing import robe_constants, robe_indices
from compress.methods.robe.module import RobeEmbeddingBagCollection
from exporters.artifacts import write as artifacts

RECIPE = """
name = "share_test"
[[tables]]
match = ["t_cat_2", "t_cat_3"]
method = "share"
compression = 10.0
block_size = 4
array_dtype = "{dtype}"
[[tables]]
match = ["*"]
method = "qat"
bits = 8
[finetune]
steps = 8
batch_size = 256
eval_every = 4
checkpoint_every = 2
"""


def _recipe(tmp_path, dtype="fp32"):
    path = tmp_path / f"share_{dtype}.toml"
    path.write_text(RECIPE.replace("{dtype}", dtype))
    return path


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_shared_tables_compress_and_write(tmp_path, dtype):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, _recipe(tmp_path, dtype))
    result = pipeline.compress(job, plan, data=train, valid=valid)
    assert any("least-squares projection" in n for n in result.notes)
    robe = [p for p in embedding_parts(result.model) if isinstance(p, RobeEmbeddingBagCollection)]
    assert len(robe) == 1 and [t.name for t in robe[0].tables] == ["t_cat_2", "t_cat_3"]
    written = artifacts.save(result, tmp_path / "out")
    (group,) = written.manifest["shared_arrays"]
    assert group["dtype"] == dtype and group["constants"] == list(robe_constants(group["seed"]))
    assert group["bytes"] == plan.share_groups[0].bytes
    stored = np.load(tmp_path / "out" / group["files"]["data"])
    assert stored.shape == (plan.share_groups[0].cells,)
    assert written.manifest["bytes"]["tables"] == plan.embedding_bytes_after
    # the stored array, hashed by the manifest's parameters, gives the model's rows
    entry = next(t for t in written.manifest["tables"] if t["name"] == "t_cat_3")
    scale = (
        np.load(tmp_path / "out" / group["files"]["scale"]) if "scale" in group["files"] else 1.0
    )
    array = torch.from_numpy(stored.astype(np.float32) * scale)
    ids = torch.arange(0, 5000, 37)
    cells = robe_indices(
        ids,
        entry["table_offset"],
        8,
        group["block_size"],
        group["cells"],
        robe_constants(group["seed"]),
    )
    assert torch.equal(array[cells], robe[0].lookup_rows("t_cat_3", ids).detach())
    if dtype == "int8":  # a scale per group of cells has no place in the format: refused
        robe[0].set_quantization(ArrayQuantization("int8", group_size=4))
        with pytest.raises(ArtifactError, match="scale per 4 cells cannot be exported yet"):
            artifacts.save(result, tmp_path / "grouped")
        assert not (tmp_path / "grouped").exists()


def test_shared_resume_equals_uninterrupted(tmp_path):
    ckpt, train, valid, _ = tiny_world(tmp_path)
    recipe = _recipe(tmp_path)
    job = pipeline.load(ckpt)
    straight = pipeline.compress(job, pipeline.plan(job, recipe), data=train, valid=valid)

    from compress.methods.apply_plan import prepare_model
    from compress.train.inputs import run_inputs
    from compress.train.loop import fit

    plan = pipeline.plan(job, recipe)
    tr, va = load_npz(train), load_npz(valid)
    counts = pipeline.row_counts(tr, job.spec)
    state = tmp_path / "state.pt"
    first, _ = prepare_model(job.module, job.spec, plan, counts)
    # the fingerprints the pipeline records: --resume continues only a run on the same inputs
    inputs = run_inputs(job.module, job.spec, plan, tr, va, plan.recipe.finetune.seed)
    fit(
        first,
        tr,
        va,
        job.spec.feature_names,
        plan.recipe.finetune,
        state_path=state,
        stop_after=5,
        inputs=inputs,
    )
    resumed = pipeline.compress(
        pipeline.load(ckpt), plan, data=train, valid=valid, state_path=state, resume=True
    )
    assert resumed.train.resumed_from == 5
    assert resumed.metrics["compressed"] == straight.metrics["compressed"]
    a = [p for p in embedding_parts(straight.model) if isinstance(p, RobeEmbeddingBagCollection)][0]
    b = [p for p in embedding_parts(resumed.model) if isinstance(p, RobeEmbeddingBagCollection)][0]
    assert torch.equal(a.weight, b.weight)


def test_budget_below_block_size_is_a_recipe_error(tmp_path):
    ckpt, *_ = tiny_world(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE.replace("compression = 10.0", "bytes = 12").replace("{dtype}", "fp32"))
    with pytest.raises(RecipeError, match="fewer than the block size"):
        pipeline.plan(pipeline.load(ckpt), path)
    path.write_text(RECIPE.replace("block_size = 4", "block_size = 0").replace("{dtype}", "fp32"))
    with pytest.raises(RecipeError, match="block_size"):
        pipeline.plan(pipeline.load(ckpt), path)


def test_manifest_without_hash_seed_is_refused(tmp_path):
    import json

    from compress.errors import ArtifactError
    from exporters.artifacts.manifest_integrity import dump_manifest, seal
    from exporters.artifacts.read import load_artifacts

    ckpt, train, valid, _ = tiny_world(tmp_path)
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, _recipe(tmp_path)), valid=valid, steps=2)
    artifacts.save(result, tmp_path / "out")
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["shared_arrays"][0]["seed"]
    manifest_path.write_text(dump_manifest(seal(manifest)))  # sealed: only the entry is wrong
    with pytest.raises(ArtifactError, match="missing seed"):
        load_artifacts(tmp_path / "out")
    manifest["shared_arrays"][0]["seed"] = 7  # constants no longer match the seed
    manifest_path.write_text(dump_manifest(seal(manifest)))
    with pytest.raises(ArtifactError, match="do not match seed 7"):
        load_artifacts(tmp_path / "out")


def test_sparse_and_dense_array_gradients_train_alike(tmp_path, monkeypatch):
    import compress.methods.robe.method as robe_method

    ckpt, train, valid, _ = tiny_world(tmp_path)
    recipe = _recipe(tmp_path)
    job = pipeline.load(ckpt)
    dense = pipeline.compress(job, pipeline.plan(job, recipe), data=train, valid=valid)
    monkeypatch.setattr(
        robe_method, "DENSE_GRAD_MAX_CELLS", 0
    )  # every array takes sparse gradients
    sparse = pipeline.compress(job, pipeline.plan(job, recipe), data=train, valid=valid)
    (a,) = [p for p in embedding_parts(dense.model) if isinstance(p, RobeEmbeddingBagCollection)]
    (b,) = [p for p in embedding_parts(sparse.model) if isinstance(p, RobeEmbeddingBagCollection)]
    assert not a.sparse and b.sparse
    torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=1e-5)
