"""Exported table-wise tables and quantized MLPs against references outside this project.

- Table-wise INT4/INT2 tables: DQRM's table-wise codes ``q`` with scale ``s`` are the FBGEMM
  row-wise rows ``codes = q + 2^(b-1)``, fp16 ``scale = s``, fp16 ``bias = -2^(b-1) s``, exactly,
  wherever fp16 holds ``s`` and ``-2^(b-1) s`` (FBGEMM's row layout: packed codes, low bits first,
  then the fp16 scale and bias; ``torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat``
  dequantizes them). The test builds those rows byte by byte itself and lets FBGEMM dequantize them.
- MLP weights: ``torch.quantize_per_channel(w, scales, zero_points=0, axis=0, dtype=torch.qint8)``
  (INT8), its codes clamped to ``[-8, 7]`` for INT4 (the MLP widths a recipe takes).

To make both references exact, every table and every MLP output channel is given a power-of-two
scale: values are clipped to ``qmax * 2^-k`` and one value set to it, so that DQRM's
``max|W| / qmax`` is ``2^-k`` (exact in fp16, and ``x * (1/s) == x / s``). A TorchRec model built
from the FP32 checkpoint with those reference tables and weights must then compute what the
converted PyTorch model computes and what ONNX Runtime serves from the artifacts.
"""

from __future__ import annotations

import copy
import math

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import pytest
import torch
from helpers import make_dlrm
from quant_reference import fused_rows

from compress import pipeline
from compress.quant.packing import pack_nbit, unpack_nbit
from compress.quant.tablewise import signed_offset, tablewise_quantize_packed, tablewise_to_rowwise
from exporters.export import export
from exporters.onnx.writer import sample_multihot
from exporters.runtime.predictor import Predictor

ROWS = (20, 300, 2000, 5000)
DIM = 8  # FBGEMM rows need dim % 4 == 0 at INT4, % 8 at INT2
MLP_ROOTS = ("dense_arch", "over_arch", "inter_arch")
ATOL_ORT = 1e-5
# torch's quantized-tensor constructors are deprecated (not gone) in the pinned torch; when they go,
# torch.fake_quantize_per_channel_affine with quant_min/quant_max is the same reference
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
CASES = {  # model class, bits of each table (all table-wise), MLP bits
    "DLRM-int4": ("DLRM", (4, 4, 4, 4), 4),
    "DCN-int2": ("DLRM_DCN", (2, 2, 2, 2), 4),  # MLPs take 8 or 4 bits
    "Projection-mixed-int8mlp": ("DLRM_Projection", (4, 2, 2, 4), 8),
}


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def power_of_two_scale(amax: float, bits: int) -> float:
    """The power of two nearest ``amax / qmax``: the scale a table or channel is given."""
    return 2.0 ** round(math.log2(amax / qmax(bits)))


@torch.no_grad()
def clip_to_scale(w: torch.Tensor, scale: float, bits: int) -> None:
    """Clip ``w`` (in place) to ``qmax * scale`` and put that value in its first element, so that
    ``max|w| / qmax == scale`` exactly."""
    top = qmax(bits) * scale
    w.clamp_(-top, top)
    w.view(-1)[0] = top


def mlp_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if name.split(".")[0] in MLP_ROOTS and isinstance(m, torch.nn.Linear)
    ]


def pack_fbgemm_rows(codes: torch.Tensor, scale: float, bias: float, bits: int) -> torch.Tensor:
    """FBGEMM fused N-bit rows, built here from the format's definition: each byte holds
    ``8/bits`` codes, the first in the low bits; then fp16 scale and fp16 bias (little-endian)."""
    per_byte = 8 // bits
    c = codes.numpy().astype(np.uint8)
    rows, dim = c.shape
    packed = np.zeros((rows, dim // per_byte), np.uint8)
    for j in range(per_byte):
        packed |= (c[:, j::per_byte] << (j * bits)).astype(np.uint8)
    tail = np.array([scale, bias], dtype="<f2").view(np.uint8)
    return torch.from_numpy(np.concatenate([packed, np.tile(tail, (rows, 1))], axis=1))


def fbgemm_table(w: torch.Tensor, scale: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, dequantized)``: ``w``'s symmetric codes at ``scale`` (torch's own quantizer,
    clamped to the ``bits`` range) as FBGEMM rows, and FBGEMM's dequantization of them."""
    q = torch.quantize_per_tensor(w, scale, 0, torch.qint8).int_repr().to(torch.int16)
    q = q.clamp(-qmax(bits) - 1, qmax(bits))
    offset = 1 << (bits - 1)
    rows = pack_fbgemm_rows((q + offset).to(torch.uint8), scale, -offset * scale, bits)
    return rows, torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(rows, bits)


def per_channel_reference(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """``torch.quantize_per_channel`` (symmetric, zero point 0), clamped to ``bits``, dequantized."""
    zeros = torch.zeros(len(scales), dtype=torch.int64)
    q = torch.quantize_per_channel(w, scales.double(), zeros, 0, torch.qint8).int_repr()
    return q.clamp(-qmax(bits) - 1, qmax(bits)).float() * scales[:, None]


def _recipe(table_bits, mlp_bits: int) -> str:
    rules = "".join(
        f'[[tables]]\nmatch = ["t_cat_{i}"]\nmethod = "ptq"\nbits = {b}\ngranularity = "table"\n'
        for i, b in enumerate(table_bits)
    )
    return f'name = "outside"\n{rules}[mlp]\nmethod = "ptq"\nbits = {mlp_bits}\n'


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
    """A checkpoint with power-of-two scales, compressed and exported; and the reference model."""
    model_class, table_bits, mlp_bits = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = make_dlrm(model_class, rows=ROWS, dim=DIM)
    ebc = model.sparse_arch.embedding_bag_collection
    table_scales = {}
    for i, bits in enumerate(table_bits):
        w = ebc.embedding_bags[f"t_cat_{i}"].weight.detach()
        table_scales[f"t_cat_{i}"] = power_of_two_scale(float(w.abs().max()) * 0.6, bits)
        clip_to_scale(w, table_scales[f"t_cat_{i}"], bits)
    channel_scales = {}
    for name, linear in mlp_linears(model):
        w = linear.weight.detach()
        amax = w.abs().amax(dim=1) * 0.8
        scales = torch.tensor([power_of_two_scale(float(a), mlp_bits) for a in amax])
        for o in range(w.shape[0]):
            clip_to_scale(w[o], float(scales[o]), mlp_bits)
        channel_scales[name] = scales
    torch.save(model.state_dict(), root / "model.pt")
    (root / "recipe.toml").write_text(_recipe(table_bits, mlp_bits))

    job = pipeline.load(root / "model.pt")
    result = pipeline.compress(job, pipeline.plan(job, root / "recipe.toml"))
    out = export(result, root / "out").path

    reference = copy.deepcopy(model)
    rows = {}
    with torch.no_grad():
        for i, bits in enumerate(table_bits):
            name = f"t_cat_{i}"
            bag = reference.sparse_arch.embedding_bag_collection.embedding_bags[name]
            rows[name], table = fbgemm_table(bag.weight.detach(), table_scales[name], bits)
            bag.weight.copy_(table)
        for name, linear in mlp_linears(reference):
            linear.weight.copy_(
                per_channel_reference(linear.weight.detach(), channel_scales[name], mlp_bits)
            )
    return {
        "job": job,
        "result": result,
        "out": out,
        "model": model,
        "reference": reference.eval(),
        "table_bits": table_bits,
        "mlp_bits": mlp_bits,
        "table_scales": table_scales,
        "channel_scales": channel_scales,
        "rows": rows,
    }


def test_stored_scales_are_the_constructed_powers_of_two(case):
    out = case["out"]
    for name, scale in case["table_scales"].items():
        stored = np.load(out / "tables" / f"{name}.scale.npy")
        assert stored.size == 1 and float(stored.reshape(-1)[0]) == scale, name
    dense = {
        p.name[: -len(".scales.npy")]: np.load(p) for p in (out / "dense").glob("*.scales.npy")
    }
    assert len(dense) == len(case["channel_scales"])
    for name, scales in case["channel_scales"].items():
        assert np.array_equal(dense[name], scales.numpy()), name


def test_tablewise_to_rowwise_conversion_gives_fbgemms_rows(case):
    """The project's exact table-wise -> row-wise conversion writes byte for byte the rows built
    here from FBGEMM's format, and FBGEMM dequantizes them to ``q * s`` exactly."""
    tables = case["model"].sparse_arch.embedding_bag_collection.embedding_bags
    for i, bits in enumerate(case["table_bits"]):
        name = f"t_cat_{i}"
        w, s = tables[name].weight.detach(), case["table_scales"][name]
        packed, scale = tablewise_quantize_packed(w, bits)
        q = (unpack_nbit(packed, bits).to(torch.int16) - signed_offset(bits)).to(torch.int8)
        assert scale == s
        codes, s16, b16 = tablewise_to_rowwise(q, scale, bits)
        rows = fused_rows(pack_nbit(codes, bits), s16, b16)
        assert torch.equal(rows, case["rows"][name]), name
        dequantized = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(
            case["rows"][name], bits
        )
        assert torch.equal(dequantized, q.float() * s), name


def test_converted_tables_equal_fbgemms_rows(case):
    """Every row of every converted table, looked up alone, is FBGEMM's dequantized row."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    spec = case["job"].spec
    ours = case["result"].model.sparse_arch.embedding_bag_collection
    ref = case["reference"].sparse_arch.embedding_bag_collection
    n = max(ROWS)
    ids, lengths = [], []
    for t in spec.tables:
        ids.append(torch.arange(n) % t.num_embeddings)
        lengths.append(torch.ones(n, dtype=torch.int64))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(spec.feature_names), values=torch.cat(ids), lengths=torch.cat(lengths)
    )
    with torch.no_grad():
        got, want = ours(kjt).to_dict(), ref(kjt).to_dict()
    assert got.keys() == want.keys()
    for f in got:
        assert torch.equal(got[f], want[f]), f


def test_served_logits_equal_the_outside_reference(case):
    """ONNX Runtime (from the artifacts) and the converted PyTorch model compute what the FP32
    TorchRec model computes with FBGEMM's tables and torch's per-channel weights."""
    spec = case["job"].spec
    data = sample_multihot(spec, 3000, seed=11, max_bag=3)  # a quarter of the bags empty
    batch = data.to_batch(spec.feature_names)
    with torch.no_grad():
        reference = case["reference"](batch.dense, batch.sparse).reshape(-1)
        converted = case["result"].model(batch.dense, batch.sparse).reshape(-1)
        fp32 = case["model"](batch.dense, batch.sparse).reshape(-1)
    served = torch.from_numpy(Predictor(case["out"], threads=1).predict(data))
    assert (converted - reference).abs().max().item() <= 1e-6
    assert (served - reference).abs().max().item() <= ATOL_ORT
    # the references are not trivially equal to the FP32 model: quantization changed the logits
    assert (fp32 - reference).abs().max().item() > 100 * ATOL_ORT
