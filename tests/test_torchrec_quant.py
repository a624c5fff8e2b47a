"""Row-wise artifacts in TorchRec's quantized EmbeddingBagCollection (FBGEMM INT8/INT4/INT2
kernels): pooled embeddings identical to ours, the state dict in FBGEMM's inference layout."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_world
from torchrec.tensor_types import UInt2Tensor, UInt4Tensor

from compress import pipeline
from compress.errors import ArtifactError
from compress.quant.fbgemm_rowwise import to_fbgemm_inference_rows
from compress.quant.packing import unpack_nbit
from exporters.artifacts import write as artifacts
from exporters.artifacts.read import load_artifacts
from exporters.onnx.writer import sample_multihot
from exporters.runtime.torchrec_ebc import quantized_ebc_from_artifacts


def _export(tmp_path, recipe: str):
    ckpt, _, _, _ = tiny_world(tmp_path, "DLRM", n=400)
    (tmp_path / "recipe.toml").write_text(recipe)
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp_path / "recipe.toml"))
    return job, result, artifacts.save(result, tmp_path / "out").path


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pooled_embeddings_equal_ours(tmp_path, bits: int) -> None:
    recipe = f'name = "rows"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = {bits}\ngranularity = "row"\n'
    job, result, out = _export(tmp_path, recipe)
    ebc = quantized_ebc_from_artifacts(
        out, chunk_rows=1000
    )  # several chunks for the 5000-row table
    data = sample_multihot(job.spec, 3000, seed=bits, max_bag=4)  # a fifth of the bags empty
    kjt = data.to_batch(job.spec.feature_names).sparse
    ours = result.model.sparse_arch.embedding_bag_collection(kjt)
    theirs = ebc(kjt)
    assert theirs.keys() == ours.keys()
    diff = (theirs.values() - ours.values()).abs().max().item()
    print(f"\nINT{bits}: max |FBGEMM - ours| = {diff}")
    assert diff == 0
    # the state dict holds FBGEMM's inference rows: [fp16 scale][fp16 bias][packed][pad]
    arts = load_artifacts(out)
    table = arts.tables["t_cat_3"]
    weight = ebc.state_dict()["embedding_bags.t_cat_3.weight"]
    wrapper = {8: torch.Tensor, 4: UInt4Tensor, 2: UInt2Tensor}[bits]
    assert type(weight) is wrapper
    raw = weight if bits == 8 else weight.view(torch.uint8)
    codes = unpack_nbit(torch.from_numpy(table.arrays["data"].copy()), bits, table.embedding_dim)
    rows = to_fbgemm_inference_rows(
        codes,
        torch.from_numpy(table.arrays["scale"].copy()),
        torch.from_numpy(table.arrays["bias"].copy()),
        bits,
    )
    assert torch.equal(raw, rows)
    # in a TorchRec DLRM: same logits as the converted model
    dense = torch.from_numpy(data.dense)
    with torch.no_grad():
        expected = result.model(dense, kjt)
        result.model.sparse_arch.embedding_bag_collection = ebc
        assert torch.equal(result.model(dense, kjt), expected)


def test_tables_that_are_not_rowwise_are_refused(tmp_path) -> None:
    recipe = (
        'name = "mix"\n[[tables]]\nmatch = ["t_cat_1"]\nmethod = "ptq"\nbits = 4\n'
        'granularity = "table"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 4\n'
    )
    _, _, out = _export(tmp_path, recipe)
    with pytest.raises(ArtifactError, match="table 't_cat_1' has layout 'tablewise'.*row-wise"):
        quantized_ebc_from_artifacts(out)
    ebc = quantized_ebc_from_artifacts(out, tables=["t_cat_0", "t_cat_3"])
    assert [c.name for c in ebc.embedding_bag_configs()] == ["t_cat_0", "t_cat_3"]
    with pytest.raises(ArtifactError, match="no table"):
        quantized_ebc_from_artifacts(out, tables=["t_nope"])
