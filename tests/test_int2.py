"""INT2 end to end: ``int2_rowwise_ptq`` (L2 ranges) and ``int2_qat`` from a TorchRec checkpoint to
packed 2-bit files, ONNX Runtime (parity within 1e-5) and TorchRec's FBGEMM INT2 kernels; QAT with
L2 ranges looks up exactly what convert stores; table-wise INT2 with L2 scales; the built-in
recipes that keep min/max ranges convert as before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_world
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compress import pipeline
from compress.errors import RecipeError
from compress.methods import registry
from compress.methods.rowwise import RowwiseConfig
from compress.methods.tablewise import TablewiseConfig
from compress.quant import native
from compress.quant.fbgemm_rowwise import rowwise_quantize_packed
from compress.quant.l2_ranges import (
    rowwise_quantize_packed_l2,
    stored_error,
    tablewise_l2_scale,
)
from compress.quant.packing import slice_chunks, unpack_nbit
from compress.quant.tablewise import table_scale, tablewise_quantize_packed
from compress.recipe.parse import load_recipe, parse_recipe
from compress.recipe.toml_out import recipe_to_toml
from compress.train import teacher
from compress.train.loop import batch_stream, bce_loss
from exporters import load_torchrec_model
from exporters.artifacts.read import load_artifacts
from exporters.export import export
from exporters.onnx.from_model import graph_spec_from_artifacts
from exporters.onnx.model import feature_input_names
from exporters.onnx.parity import plain_session, run_session

ATOL = 1e-5


def _compress(tmp_path, recipe, train: bool = True, n: int = 3000):
    ckpt, train_path, valid_path, _ = tiny_world(tmp_path, n=n)
    if "\n" in recipe:
        (tmp_path / "recipe.toml").write_text(recipe)
        recipe = tmp_path / "recipe.toml"
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, recipe)
    result = pipeline.compress(job, plan, data=train_path if train else None, valid=valid_path)
    return job, plan, result


def _weights(job) -> dict[str, torch.Tensor]:
    state = job.module.state_dict()
    return {
        t.name: state[f"sparse_arch.embedding_bag_collection.embedding_bags.{t.name}.weight"]
        for t in job.spec.tables
    }


def _torchrec_matches_ort(out) -> None:
    """TorchRec's model loaded from the artifacts (FBGEMM INT2 rows) scores the stored parity
    inputs as ONNX Runtime does, within 1e-5."""
    model = load_torchrec_model(out)
    arts = load_artifacts(out)
    session = plain_session(arts.file(arts.onnx["graphs"]["model"]["file"]))
    names = feature_input_names(graph_spec_from_artifacts(arts))
    for entry in arts.manifest["onnx"]["parity"]["reference_data"].values():
        feeds = {k: np.load(arts.file(v)) for k, v in entry["inputs"].items()}
        values, lengths = [], []
        for f in arts.spec.feature_names:
            ids = feeds[names[f][0]]
            rows = arts.spec.table_of_feature(f).num_embeddings
            values.append(torch.from_numpy(np.where((ids < 0) | (ids >= rows), 0, ids)))
            lengths.append(torch.from_numpy(feeds[names[f][1]]))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(arts.spec.feature_names), values=torch.cat(values), lengths=torch.cat(lengths)
        )
        with torch.no_grad():
            got = model(torch.from_numpy(feeds["dense"]), kjt).numpy()
        assert float(np.abs(got - run_session(session, feeds)["logits"]).max()) <= ATOL


def test_int2_rowwise_ptq_end_to_end(tmp_path) -> None:
    """Packed 2-bit FBGEMM rows whose every row's error is at most PyTorch's
    ``embedding_bag_2bit_prepack(optimized_qparams=True)``'s (and below it in total); ORT and
    TorchRec serve them exactly; the plan and the manifest's recipe record the ranges."""
    job, plan, result = _compress(tmp_path, "int2_rowwise_ptq", train=False)
    assert {t.rule_text for t in plan.tables} == {"*: ptq INT2 row l2"}
    written = export(result, tmp_path / "out")
    assert max(written.manifest["onnx"]["parity"]["max_abs_diff"].values()) <= ATOL
    assert 'ranges = "l2"' in written.manifest["recipe"]["toml"]
    arts = load_artifacts(written.path)
    ours_total = theirs_total = 0.0
    for name, w in _weights(job).items():
        table = arts.tables[name]
        assert (table.layout, table.bits) == ("rowwise", 2)
        assert table.arrays["data"].shape == (w.shape[0], w.shape[1] // 4)
        scale = torch.from_numpy(np.array(table.arrays["scale"])).float()
        bias = torch.from_numpy(np.array(table.arrays["bias"])).float()
        ours = stored_error(w, scale, bias, 2)[0]
        ref = torch.ops.quantized.embedding_bag_2bit_prepack(w, optimized_qparams=True)
        nb = w.shape[1] // 4
        r_scale = ref[:, nb : nb + 2].contiguous().view(torch.float16).reshape(-1).float()
        r_bias = ref[:, nb + 2 :].contiguous().view(torch.float16).reshape(-1).float()
        theirs = stored_error(w, r_scale, r_bias, 2)[0]
        assert bool((ours <= theirs).all())
        ours_total, theirs_total = (
            ours_total + float(ours.sum()),
            theirs_total + float(theirs.sum()),
        )
        codes = unpack_nbit(torch.from_numpy(np.array(table.arrays["data"])), 2, w.shape[1])
        packed, s16, b16 = rowwise_quantize_packed_l2(w, 2)
        assert torch.equal(codes, unpack_nbit(packed, 2, w.shape[1]))
    assert ours_total < 0.95 * theirs_total
    _torchrec_matches_ort(written.path)


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["row", "table"])
def test_int2_qat_end_to_end(tmp_path, monkeypatch, granularity: str) -> None:
    """INT2 QAT (the built-in: row-wise with L2 ranges; and table-wise with L2 scales) trains,
    exports packed 2-bit tables that ORT and TorchRec serve within 1e-5, and the exported model
    scores what the fine-tuned one scored."""
    recipe = (
        f'name = "q2"\n[[tables]]\nmatch = ["*"]\nmethod = "qat"\nbits = 2\n'
        f'granularity = "{granularity}"\nranges = "l2"\nscale_refresh = 5\n'
        if granularity == "table"
        else 'name = "q2"\n[[tables]]\nmatch = ["*"]\nmethod = "qat"\nbits = 2\nranges = "l2"\n'
    )
    recipe += '[mlp]\nmethod = "qat"\nbits = 4\n[finetune]\nsteps = 12\nbatch_size = 256\n'
    recipe += 'eval_every = 4\ntarget = "teacher"\n' if granularity == "row" else "eval_every = 4\n"
    taught = []
    real = teacher.teacher_probabilities

    def spy(model, batch):
        taught.append(len(batch.labels))
        return real(model, batch)

    monkeypatch.setattr(teacher, "teacher_probabilities", spy)
    job, plan, result = _compress(tmp_path, recipe)
    assert len(taught) == (12 if granularity == "row" else 0)  # the teacher scored every batch
    assert result.train is not None and result.train.steps == 12
    written = export(result, tmp_path / "out")
    assert max(written.manifest["onnx"]["parity"]["max_abs_diff"].values()) <= ATOL
    layout = "rowwise" if granularity == "row" else "tablewise"
    assert {(t["layout"], t["bits"]) for t in written.manifest["tables"]} == {(layout, 2)}
    _torchrec_matches_ort(written.path)


def test_builtin_int2_qat_recipe() -> None:
    recipe = load_recipe("int2_qat")
    assert [r.config for r in recipe.rules] == [RowwiseConfig(2, True, "l2")]
    assert recipe.mlp.method == "qat" and recipe.mlp.bits == 4
    assert recipe.finetune is not None and recipe.finetune.target == "teacher"
    assert load_recipe("int4_qat").finetune.target == "labels"  # the others fit the labels


def test_target_key() -> None:
    text = 'name = "t"\n[[tables]]\nmatch = ["*"]\nmethod = "qat"\nbits = 2\n[finetune]\n'
    assert parse_recipe(text + "steps = 1\n").finetune.target == "labels"
    taught = parse_recipe(text + 'target = "teacher"\n')
    assert taught.finetune.target == "teacher"
    assert parse_recipe(recipe_to_toml(taught)) == taught
    with pytest.raises(RecipeError) as e:
        parse_recipe(text + 'target = "model"\n', "t.toml")
    assert (
        str(e.value) == 't.toml: finetune: target must be one of "labels", "teacher", got "model"'
    )


def test_teacher_loss_fits_the_original_models_probabilities(tmp_path) -> None:
    """The loss of ``target = "teacher"`` is BCE against the original model's probabilities on
    the batch's own inputs: the labels do not enter it, and it differs from the labels' loss."""
    from compress.data.npz import load_npz

    ckpt, train_path, _, model = tiny_world(tmp_path, n=600)
    data = load_npz(train_path)
    names = tuple(f"cat_{i}" for i in range(4))
    batch = next(batch_stream(data, names, 64, 0, 0))
    student = pipeline.compress(
        pipeline.load(ckpt), pipeline.plan(pipeline.load(ckpt), "int2_rowwise_ptq")
    ).model
    loss = teacher.teacher_loss(model)(student, batch)
    with torch.no_grad():
        target = torch.sigmoid(model(batch.dense, batch.sparse).reshape(-1))
    logits = student(batch.dense, batch.sparse).reshape(-1)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(loss, expected, rtol=0, atol=1e-7)
    flipped = type(batch)(batch.dense, batch.sparse, 1 - batch.labels)
    assert torch.equal(teacher.teacher_loss(model)(student, flipped), loss)
    assert not torch.allclose(bce_loss(student, batch), loss)
    assert model.training  # the teacher's mode is left as it was


@pytest.mark.parametrize("bits", [4, 2])
def test_qat_lookup_with_l2_ranges_is_what_convert_stores(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(500, 16, generator=g) * torch.rand(500, 1, generator=g)
    method = registry.for_config(RowwiseConfig(bits, True, "l2"))
    prepared = method.prepare(RowwiseConfig(bits, True, "l2"), w.clone())
    ids = torch.tensor([0, 499, 17, 17, 250])
    looked_up = prepared.lookup(ids).detach()
    converted = method.convert(prepared, "t")
    assert torch.equal(looked_up, converted.lookup(ids))
    # min/max fake quantization would give other values: the lookup really takes the ranges
    minmax = native.fake_quantize_rowwise_(w[ids].clone(), bits)
    assert not torch.equal(looked_up, minmax)


def test_tablewise_l2_qat_refreshes_to_the_l2_scale() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 16, generator=g) * 0.1
    w[5, 5] = 3.0
    config = TablewiseConfig(2, True, 5, "l2")
    method = registry.for_config(config)
    prepared = method.prepare(config, w.clone())
    expected = tablewise_l2_scale(lambda: slice_chunks(w, 1000), 2)
    assert float(prepared.scale) == expected < table_scale(w, 2)
    with torch.no_grad():
        prepared.weight[5, 5] = 0.0  # the outlier goes: the next refresh sees a narrower table
    prepared.training_step(4)
    assert float(prepared.scale) == expected  # not a refresh step
    prepared.training_step(5)
    narrower = tablewise_l2_scale(lambda: slice_chunks(prepared.weight.detach(), 1000), 2)
    assert float(prepared.scale) == narrower != expected
    converted = method.convert(prepared, "t")
    assert float(converted.scale) == narrower
    packed, _ = tablewise_quantize_packed(prepared.weight.detach(), 2, narrower)
    assert torch.equal(converted.data, packed)


def test_minmax_builtins_convert_as_before(tmp_path) -> None:
    """The built-ins that existed keep their bytes: ``int4_ptq`` (table-wise, DQRM's max|W| scale)
    and ``int4_rowwise_ptq`` (FBGEMM's min/max rows); ``int2_rowwise_ptq`` stores L2 rows, which
    differ from min/max's."""
    ckpt, _, _, _ = tiny_world(tmp_path, n=600)
    job = pipeline.load(ckpt)
    weights = _weights(job)
    models = {
        r: pipeline.compress(job, pipeline.plan(job, r)).model
        for r in ("int4_ptq", "int4_rowwise_ptq", "int2_rowwise_ptq")
    }
    tables = {r: m.sparse_arch.embedding_bag_collection.quantized for r, m in models.items()}
    differ = 0
    for name, w in weights.items():
        t = tables["int4_ptq"][name]
        packed, scale = tablewise_quantize_packed(w, 4)
        assert torch.equal(t.data, packed) and float(t.scale) == scale
        for recipe, bits, quantize in (
            ("int4_rowwise_ptq", 4, rowwise_quantize_packed),
            ("int2_rowwise_ptq", 2, rowwise_quantize_packed_l2),
        ):
            r = tables[recipe][name]
            expected = quantize(w, bits)
            assert all(
                torch.equal(a, b) for a, b in zip((r.data, r.scale, r.bias), expected, strict=True)
            )
        differ += int(
            not torch.equal(tables["int2_rowwise_ptq"][name].data, rowwise_quantize_packed(w, 2)[0])
        )
    assert differ == len(weights)
