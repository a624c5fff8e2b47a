"""ONNX Runtime serves exactly what PyTorch computes: every bit width (8/4/2) x granularity
(row/table), all three DLRM classes, PTQ and QAT, multi-hot bags with empty ones.

Each case compresses a small TorchRec model with :func:`compress.pipeline.compress`, writes the
artifact directory with the ONNX writer (which proves parity on its own samples while writing), then
scores the same 10k samples with the :class:`~exporters.runtime.predictor.Predictor` (ORT) and with the
PyTorch converted model: logits within 1e-5, AUC equal to 4 decimals.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import tiny_world

from compress import pipeline
from compress.data.dataset import Dataset
from compress.train.evaluate import predict_logits
from compress.train.metrics import auc
from exporters.artifacts import write as artifacts
from exporters.artifacts.read import load_artifacts
from exporters.onnx.from_model import graph_spec_from_model
from exporters.onnx.writer import GRAPH_FILES, onnx_writer, sample_multihot
from exporters.runtime.predictor import Predictor

ATOL = 1e-5
N_SAMPLES = 10_000


def _rule(match: str, bits: int, granularity: str, method: str = "ptq") -> str:
    return f'[[tables]]\nmatch = ["{match}"]\nmethod = "{method}"\nbits = {bits}\ngranularity = "{granularity}"\n'


# Two recipes cover the six (bits, granularity) pairs on one model; keep/fp16 tables and float,
# INT8 and INT4 MLPs ride along.
RECIPES = {
    "r8t8r4t4": "name = 'a'\n"
    + "".join(
        _rule(f"t_cat_{i}", b, g)
        for i, (b, g) in enumerate([(8, "row"), (8, "table"), (4, "row"), (4, "table")])
    )
    + '[mlp]\nmethod = "ptq"\nbits = 8\n',
    "r2t2keep16": "name = 'b'\n"
    + _rule("t_cat_0", 2, "row")
    + _rule("t_cat_1", 2, "table")
    + '[[tables]]\nmatch = ["t_cat_2"]\nmethod = "keep"\n[[tables]]\nmatch = ["*"]\nmethod = "fp16"\n'
    + '[mlp]\nmethod = "ptq"\nbits = 4\n',
}
QAT_RECIPE = (
    "name = 'q'\n"
    + _rule("t_cat_0", 4, "table", "qat")
    + _rule("*", 4, "row", "qat")
    + '[mlp]\nmethod = "qat"\nbits = 4\n[finetune]\nsteps = 4\nbatch_size = 256\neval_every = 0\n'
)


def labelled_samples(model: torch.nn.Module, spec, seed: int = 7) -> Dataset:
    """10k multi-hot samples (bags of 0..3 ids, a quarter empty) labelled by the FP32 model."""
    data = sample_multihot(spec, N_SAMPLES, seed, max_bag=3)
    logits = predict_logits(lambda b: model(b.dense, b.sparse), data, spec.feature_names)
    rng = np.random.default_rng(seed)
    z = 3 * (logits - logits.mean()) / (logits.std() + 1e-12)  # a clear signal: AUC around 0.8
    labels = (rng.random(N_SAMPLES) < 1 / (1 + np.exp(-z))).astype(np.float32)
    return Dataset(dense=data.dense, labels=labels, values=data.values, offsets=data.offsets)


def export_case(tmp_path, model_class: str, recipe: str, train: bool = False):
    ckpt, train_path, valid_path, _ = tiny_world(tmp_path, model_class)
    (tmp_path / "recipe.toml").write_text(recipe)
    job = pipeline.load(ckpt)
    result = pipeline.compress(
        job,
        pipeline.plan(job, tmp_path / "recipe.toml"),
        data=train_path if train else None,
        valid=valid_path,
    )
    written = artifacts.save(result, tmp_path / "out", extra_writers=(onnx_writer(result.model),))
    return job, result, written


def check_parity(tmp_path, job, result, written, case: str) -> None:
    out = written.path
    for rel in GRAPH_FILES.values():
        onnx.checker.check_model(str(out / rel), full_check=True)
    recorded = written.manifest["onnx"]["parity"]["max_abs_diff"]
    assert max(recorded.values()) <= ATOL
    data = labelled_samples(job.module, job.spec)
    assert (np.diff(data.offsets["cat_0"]) == 0).mean() > 0.2  # empty bags are in there
    model = result.model.eval()
    torch_logits = predict_logits(lambda b: model(b.dense, b.sparse), data, job.spec.feature_names)
    ort_logits = Predictor(out, threads=1).predict(data)
    diff = float(np.abs(torch_logits.astype(np.float64) - ort_logits).max())
    a_torch, a_ort = auc(torch_logits, data.labels), auc(ort_logits, data.labels)
    print(
        f"\n{case}: max |ORT - PyTorch| = {diff:.3g} over {N_SAMPLES} samples; "
        f"AUC {a_ort:.6f} (ORT) vs {a_torch:.6f} (PyTorch); writer's check {recorded}"
    )
    assert diff <= ATOL
    assert round(a_ort, 4) == round(a_torch, 4) and abs(a_ort - a_torch) < 1e-4


@pytest.mark.parametrize("model_class", ["DLRM", "DLRM_DCN", "DLRM_Projection"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_ptq_parity(tmp_path, model_class: str, recipe: str) -> None:
    job, result, written = export_case(tmp_path, model_class, RECIPES[recipe])
    layouts = {(t["layout"], t["bits"]) for t in written.manifest["tables"]}
    expected = {("rowwise", 8), ("tablewise", 8), ("rowwise", 4), ("tablewise", 4)}
    if recipe == "r2t2keep16":
        expected = {("rowwise", 2), ("tablewise", 2), ("fp32", None), ("fp16", None)}
    assert layouts == expected
    check_parity(tmp_path, job, result, written, f"{model_class} {recipe}")


def test_qat_parity(tmp_path) -> None:
    job, result, written = export_case(tmp_path, "DLRM_DCN", QAT_RECIPE, train=True)
    assert result.train is not None and result.train.steps == 4
    check_parity(tmp_path, job, result, written, "DLRM_DCN int4 QAT")


def test_shared_array_parity(tmp_path) -> None:
    recipe = (
        "name = 's'\n[[tables]]\nmatch = ['t_cat_2', 't_cat_3']\nmethod = 'share'\ncompression = 10.0\n"
        "block_size = 4\ngroup = 'big'\narray_dtype = 'int8'\n"
        + _rule("*", 4, "row")
        + "[finetune]\nsteps = 2\nbatch_size = 256\n"
    )
    job, result, written = export_case(tmp_path, "DLRM", recipe, train=True)
    assert [t["layout"] for t in written.manifest["tables"]] == [
        "rowwise",
        "rowwise",
        "robe",
        "robe",
    ]
    check_parity(tmp_path, job, result, written, "DLRM ROBE-Z int8 array + INT4 rows")


def test_graph_spec_from_model_equals_from_artifacts(tmp_path) -> None:
    job, result, written = export_case(tmp_path, "DLRM_Projection", RECIPES["r8t8r4t4"])
    from_model = graph_spec_from_model(result.model, job.spec)
    from_files = load_artifacts(written.path).spec
    assert from_files.feature_names == job.spec.feature_names
    from exporters.onnx.from_model import graph_spec_from_artifacts

    from_arts = graph_spec_from_artifacts(written.path)
    assert (
        from_model.features == from_arts.features
        and from_model.model_class == from_arts.model_class
    )
    for a, b in zip(from_model.tables, from_arts.tables, strict=True):
        assert (a.name, a.features, a.dim, type(a.kind)) == (
            b.name,
            b.features,
            b.dim,
            type(b.kind),
        )
        for field in ("packed", "scale", "bias", "weight"):
            if hasattr(a.kind, field):
                assert np.array_equal(
                    np.asarray(getattr(a.kind, field)), np.asarray(getattr(b.kind, field))
                )
    for part in ("dense_arch", "over_arch", "branch1", "branch2"):
        for a, b in zip(getattr(from_model, part), getattr(from_arts, part), strict=True):
            assert np.array_equal(a.qweight, b.qweight) and np.array_equal(a.scales, b.scales)
            assert np.array_equal(a.bias, b.bias) and a.bits == b.bits


@pytest.mark.parametrize(
    "recipe",
    [
        RECIPES["r8t8r4t4"],
        # all INT4 row-wise: the hinted features form one group, cat_1 another, so the full
        # model sees its features in the order 0, 2, 3, 1 (the interaction permutes its indices)
        "name = 'r4'\n" + _rule("*", 4, "row") + '[mlp]\nmethod = "ptq"\nbits = 8\n',
    ],
    ids=["mixed", "rowwise4"],
)
def test_one_hot_layout_hint_from_data(tmp_path, recipe: str) -> None:
    """The pipeline finds the features the data shows one-hot; ``export`` looks them up apart
    (a layout hint) and records them; ORT still matches PyTorch on the 10k multi-hot samples,
    which break the hint in every batch."""
    from exporters.export import export

    ckpt, train_path, valid_path, _ = tiny_world(tmp_path)
    (tmp_path / "recipe.toml").write_text(recipe)
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, tmp_path / "recipe.toml")
    result = pipeline.compress(job, plan, data=train_path, valid=valid_path)
    assert result.one_hot_features == ("cat_0", "cat_2", "cat_3")  # cat_1 holds bags of 2
    written = export(result, tmp_path / "out")
    assert written.manifest["onnx"]["export"]["one_hot_features"] == ["cat_0", "cat_2", "cat_3"]
    from exporters.onnx.from_model import graph_spec_from_artifacts

    hint = graph_spec_from_artifacts(written.path).one_hot_features
    assert hint == {"cat_0", "cat_2", "cat_3"}  # read back from the manifest
    check_parity(tmp_path, job, result, written, "one-hot layout hint")


def test_one_hot_hint_must_name_known_features(tmp_path) -> None:
    from exporters.onnx.writer import OnnxExportConfig

    job, result, _ = export_case(tmp_path, "DLRM", RECIPES["r8t8r4t4"])
    config = OnnxExportConfig(one_hot_features=("cat_0", "nope"))
    with pytest.raises(ValueError, match="nope"):
        artifacts.save(
            result, tmp_path / "out2", extra_writers=(onnx_writer(result.model, config),)
        )
    assert not (tmp_path / "out2").exists()
