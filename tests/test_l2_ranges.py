"""L2 ranges (recipe ``ranges = "l2"``): PyTorch's greedy range search byte for byte, a refinement
that never raises a row's error, the same FBGEMM rows whatever reads them, and the recipe key.

Reference: ``torch.ops.quantized.embedding_bag_4bit_prepack(w, optimized_qparams=True)`` and
``embedding_bag_2bit_prepack`` (the search of Guan et al. 2019, PyTorch's
``choose_qparams_optimized``), whose fused rows are ``[packed codes][fp16 scale][fp16 bias]``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import require_c_compiler

from compress.errors import RecipeError
from compress.methods.rowwise import RowwiseConfig
from compress.methods.tablewise import TablewiseConfig
from compress.quant import native
from compress.quant.fbgemm_rowwise import rowwise_quantize_packed
from compress.quant.l2_ranges import (
    DEFAULT_SEARCH,
    PYTORCH_SEARCH,
    RangeSearch,
    fake_quantize_rowwise_l2_,
    l2_params,
    l2_params_reference,
    rowwise_quantize_packed_l2,
    stored_error,
    tablewise_error,
    tablewise_l2_scale,
)
from compress.quant.packing import slice_chunks, unpack_nbit
from compress.quant.tablewise import table_scale, tablewise_scale_fits_fbgemm
from compress.recipe.parse import load_recipe, parse_recipe
from compress.recipe.toml_out import recipe_to_toml

PREPACK = {
    4: torch.ops.quantized.embedding_bag_4bit_prepack,
    2: torch.ops.quantized.embedding_bag_2bit_prepack,
}


def fused(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[packed][fp16 scale][fp16 bias]`` per row, the layout of PyTorch's prepack ops."""
    halves = (t.contiguous().view(torch.uint8).reshape(-1, 2) for t in (scale, bias))
    return torch.cat([packed, *halves], dim=1)


def awkward_rows(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Rows of every scale (trained-like magnitudes), with the corner cases: all-zero rows of
    either zero sign and mixed signs, constant rows, one outlier, tiny and large values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g) * torch.rand(rows, 1, generator=g).pow(3)
    w[0] = 0.0
    w[1] = -0.0
    w[2, ::2] = -0.0
    w[2, 1::2] = 0.0
    w[3] = 0.25  # constant
    w[4] = -7.5
    w[5, 0] = 30.0  # one outlier
    w[6] *= 1e-6
    w[7] *= 1000.0
    w[8, 3] = -0.0  # a zero minimum of one sign among positive values
    w[8].abs_()
    return w


def dequantized(packed, scale, bias, bits: int, dim: int) -> torch.Tensor:
    codes = unpack_nbit(packed, bits, dim).float()
    return codes * scale.float()[:, None] + bias.float()[:, None]


def row_errors(w: torch.Tensor, packed, scale, bias, bits: int) -> torch.Tensor:
    back = dequantized(packed, scale, bias, bits, w.shape[1]).double()
    return (w.double() - back).square().sum(dim=1)


# -- PyTorch's search, byte for byte ------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dim", [8, 16, 24, 64])
def test_pytorch_search_equals_prepack_op(bits: int, dim: int) -> None:
    require_c_compiler()
    w = awkward_rows(1003, dim, seed=dim + bits)
    expected = PREPACK[bits](w, optimized_qparams=True)
    got = fused(*rowwise_quantize_packed_l2(w, bits, search=PYTORCH_SEARCH))
    assert torch.equal(got, expected)  # the sign of zero biases included
    # and the min/max quantizer differs on most rows: the test sees the search
    minmax = fused(*rowwise_quantize_packed(w, bits))
    assert (minmax != expected).any(dim=1).float().mean() > 0.01


@pytest.mark.parametrize("chunk", [1, 7, 16, 33, 1000])
def test_chunk_boundaries_change_no_byte(chunk: int) -> None:
    """Chunks of any size (the kernel takes 16 rows a vector): the same bytes as one pass and as
    the prepack op, and the same with the defaults' refinement."""
    w = awkward_rows(101, 16, seed=3)
    expected = PREPACK[4](w, optimized_qparams=True)
    assert torch.equal(
        fused(*rowwise_quantize_packed_l2(w, 4, chunk, search=PYTORCH_SEARCH)), expected
    )
    whole = fused(*rowwise_quantize_packed_l2(w, 2))
    assert torch.equal(fused(*rowwise_quantize_packed_l2(w, 2, chunk)), whole)
    chunks = list(slice_chunks(w, chunk))
    assert torch.equal(fused(*rowwise_quantize_packed_l2(w, 2, chunks=chunks)), whole)


@pytest.mark.parametrize(
    "search", [PYTORCH_SEARCH, DEFAULT_SEARCH, RangeSearch(ratio=0.3, refine=2)]
)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_compiled_kernel_equals_pytorch_reference(search: RangeSearch, bits: int) -> None:
    """The compiled search (16 rows a vector, threads) and the PyTorch reference give the same
    scales and biases, bit for bit (a zero bias's sign included)."""
    require_c_compiler()
    w = awkward_rows(203, 16, seed=bits)
    s_ref, b_ref = l2_params_reference(w, bits, search)
    s_c, b_c = native.l2_params(w, bits, search.bins, search.ratio32, search.refine)
    assert torch.equal(s_c.view(torch.int32), s_ref.view(torch.int32))
    assert torch.equal(b_c.view(torch.int32), b_ref.view(torch.int32))


def test_pytorch_path_without_kernels_gives_the_same_bytes(monkeypatch) -> None:
    w = awkward_rows(67, 16, seed=5)
    compiled = fused(*rowwise_quantize_packed_l2(w, 2))
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native._kernels.cache_clear()
    try:
        assert not native.enabled()
        assert torch.equal(fused(*rowwise_quantize_packed_l2(w, 2)), compiled)
        expected = PREPACK[4](w, optimized_qparams=True)
        assert torch.equal(
            fused(*rowwise_quantize_packed_l2(w, 4, search=PYTORCH_SEARCH)), expected
        )
    finally:
        monkeypatch.delenv(native.ENV_SWITCH)
        native._kernels.cache_clear()


# -- never worse than PyTorch's choice, nor than min/max ----------------------------------------


@pytest.mark.parametrize("bits", [4, 2])
def test_default_error_never_above_pytorch_nor_minmax(bits: int) -> None:
    """The default search walks PyTorch's path, then refines only when a row's error falls: every row's error is at most the prepack op's, which is at most min/max's (up to
    float32 rounding of the search's own loss); and the refinement does help."""
    w = awkward_rows(2000, 16, seed=11 + bits)
    ours = row_errors(w, *rowwise_quantize_packed_l2(w, bits), bits)
    ref = PREPACK[bits](w, optimized_qparams=True)
    theirs = row_errors(w, *_split(ref, bits, 16), bits)
    minmax = row_errors(w, *rowwise_quantize_packed(w, bits), bits)
    assert bool((ours <= theirs).all())
    assert bool((theirs <= minmax * (1 + 1e-5) + 1e-30).all())
    assert (ours < theirs).float().mean() > 0.5
    some = theirs > 0
    assert (ours[some] / theirs[some]).mean() < 0.97


def _split(rows: torch.Tensor, bits: int, dim: int):
    nb = dim * bits // 8
    scale = rows[:, nb : nb + 2].contiguous().view(torch.float16).reshape(-1)
    bias = rows[:, nb + 2 : nb + 4].contiguous().view(torch.float16).reshape(-1)
    return rows[:, :nb].contiguous(), scale, bias


def test_a_longer_walk_keeps_the_default_walk_and_goes_on() -> None:
    """A longer walk (INT2 rows' best range is often narrower) takes PyTorch's steps first: its
    error is never above the default walk's, and below it on many rows."""
    w = awkward_rows(1500, 16, seed=2)
    longer = RangeSearch(ratio=0.3)
    e_default = stored_error(w, *l2_params(w, 2, PYTORCH_SEARCH), 2)[0]
    e_longer = stored_error(w, *l2_params(w, 2, longer), 2)[0]
    assert bool((e_longer <= e_default * (1 + 1e-6)).all())
    assert (e_longer < e_default * 0.999).float().mean() > 0.1


def test_fake_quantization_equals_the_converted_rows() -> None:
    """A QAT lookup of an l2 table sees exactly what convert stores (and rows stay independent)."""
    w = awkward_rows(300, 16, seed=4)
    for bits in (4, 2):
        packed, scale, bias = rowwise_quantize_packed_l2(w, bits)
        stored = dequantized(packed, scale, bias, bits, 16)
        fq = fake_quantize_rowwise_l2_(w.clone(), bits)
        assert torch.equal(fq, stored)
        rows = torch.tensor([7, 3, 3, 250])
        assert torch.equal(fake_quantize_rowwise_l2_(w[rows].clone(), bits), stored[rows])


def test_bad_rows_are_refused() -> None:
    w = awkward_rows(40, 16)
    w[21, 5] = float("nan")
    with pytest.raises(ValueError, match="row 21 holds a NaN or an infinite value"):
        rowwise_quantize_packed_l2(w, 4)
    w[21, 5] = 0.0
    w[30] = torch.linspace(0, 1e6, 16)
    with pytest.raises(ValueError, match="not finite in fp16"):
        rowwise_quantize_packed_l2(w, 4)


def test_search_settings_are_checked() -> None:
    for bad in ({"bins": 0}, {"ratio": 1.0}, {"ratio": -0.1}, {"refine": -1}):
        with pytest.raises(ValueError):
            RangeSearch(**bad)


# -- table-wise L2 scale --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 2])
def test_tablewise_l2_scale_lowers_the_error_and_converts(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(5000, 16, generator=g) * torch.rand(5000, 1, generator=g)
    w[17, 3] = 9.0  # an outlier sets max|W|

    def read():
        return slice_chunks(w, 777)

    s = tablewise_l2_scale(read, bits)
    base = table_scale(w, bits)
    assert s < base and tablewise_scale_fits_fbgemm(s, bits)
    assert tablewise_error(read(), s, bits) < 0.5 * tablewise_error(read(), base, bits)
    assert tablewise_l2_scale(lambda: slice_chunks(torch.zeros(4, 16), 2), bits) == 1.0
    with pytest.raises(ValueError, match="inf or NaN"):
        tablewise_l2_scale(lambda: slice_chunks(torch.full((2, 16), float("inf")), 1), bits)


# -- the recipe key -------------------------------------------------------------------------------

RULE = 'name = "r"\n[[tables]]\nmatch = ["*"]\nmethod = "{method}"\nbits = {bits}\n{extra}'


def _parse(method: str = "ptq", bits: int = 4, extra: str = "", finetune: bool = False):
    text = RULE.format(method=method, bits=bits, extra=extra)
    return parse_recipe(text + ("[finetune]\nsteps = 1\n" if finetune else ""), "r.toml")


def test_ranges_defaults_and_round_trip() -> None:
    assert _parse().rules[0].config == RowwiseConfig(4, ranges="minmax")
    assert _parse(bits=2).rules[0].config == RowwiseConfig(2, ranges="l2")
    assert _parse(bits=8).rules[0].config == RowwiseConfig(8, ranges="minmax")
    assert _parse("qat", finetune=True).rules[0].config == RowwiseConfig(4, True, "minmax")
    table = _parse(extra='granularity = "table"\n').rules[0].config
    assert table == TablewiseConfig(4, ranges="minmax")
    for recipe in (
        _parse(extra='ranges = "minmax"\n'),
        _parse("qat", 2, 'ranges = "l2"\n', finetune=True),
        _parse("qat", 2, 'granularity = "table"\nranges = "l2"\n', finetune=True),
    ):
        assert parse_recipe(recipe_to_toml(recipe)) == recipe
    assert _parse().rules[0].describe() == "*: ptq INT4 row"
    assert _parse(extra='ranges = "l2"\n').rules[0].describe() == "*: ptq INT4 row l2"
    qat_table = _parse("qat", 2, 'granularity = "table"\nranges = "l2"\n', finetune=True)
    assert qat_table.rules[0].describe() == "*: qat INT2 table l2 P=200"


@pytest.mark.parametrize(
    ("method", "extra", "message"),
    [
        (
            "ptq",
            'ranges = "mse"\n',
            'r.toml: tables[0]: ranges must be one of "minmax", "l2", got "mse"',
        ),
        ("ptq", "ranges = 2\n", 'r.toml: tables[0]: ranges must be one of "minmax", "l2", got 2'),
        ("ptq", "ranges = true\n", 'ranges must be one of "minmax", "l2", got true'),
        ("keep", 'ranges = "l2"\n', "key 'ranges' does not apply to method 'keep'"),
        ("fp16", 'ranges = "l2"\n', "key 'ranges' does not apply to method 'fp16'"),
    ],
)
def test_ranges_key_errors_are_one_line(method: str, extra: str, message: str) -> None:
    text = f'name = "r"\n[[tables]]\nmatch = ["*"]\nmethod = "{method}"\n'
    if method == "ptq":
        text += "bits = 4\n"
    with pytest.raises(RecipeError) as e:
        parse_recipe(text + extra, "r.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_share_rule_refuses_ranges() -> None:
    text = (
        'name = "r"\n[[tables]]\nmatch = ["*"]\nmethod = "share"\ncompression = 10.0\n'
        'block_size = 4\nranges = "l2"\n[finetune]\nsteps = 1\n'
    )
    with pytest.raises(RecipeError, match=r"^r.toml: tables\[0\]: key 'ranges' does not apply"):
        parse_recipe(text, "r.toml")


def test_builtin_recipes_ranges() -> None:
    """The new INT2 built-ins take L2 ranges; every built-in that existed keeps min/max (L2 is the
    row-wise PTQ default at INT2 only), so their plans and bytes are as they were."""
    assert load_recipe("int4_rowwise_ptq").rules[0].config == RowwiseConfig(4)
    assert load_recipe("int8_ptq").rules[0].config == RowwiseConfig(8)
    assert load_recipe("int2_rowwise_ptq").rules[0].config == RowwiseConfig(2, ranges="l2")
    assert load_recipe("int4_ptq").rules[0].config == TablewiseConfig(4)
    assert load_recipe("int4_qat").rules[0].config == TablewiseConfig(4, True, 200)
    mixed = load_recipe("mixed_int4_int8").rules
    assert [r.config.ranges for r in mixed[:2]] == ["minmax", "minmax"]
