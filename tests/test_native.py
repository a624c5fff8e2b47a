"""The compiled fake-quant kernels: bit-exact with FBGEMM and with the PyTorch reference, and an
unbuildable kernel falls back loudly to the same values. Without a C compiler the tests that need
the kernels skip (naming the reason) and the rest check the PyTorch path."""

from __future__ import annotations

import logging
import warnings

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import pytest
import torch
from helpers import require_c_compiler
from quant_reference import fake_quantize_tablewise

from compress.quant import fake_quant, native
from compress.quant.packing import can_pack
from compress.quant.tablewise import table_scale


def _hard_rows(rows: int = 512, dim: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=gen) * torch.logspace(-8, 4, rows).unsqueeze(1)
    w[5] = 0.7  # a constant row
    w[6] = 1000.3  # fp16(min) > max: FBGEMM's scale goes negative
    w[7] = 0.0
    w[8, ::2] = -2.5e4  # large magnitudes
    w[9] = 6e-8  # fp16 subnormal range
    w[10, :3] = -3e-6
    w[11] = torch.tensor([0.5, 1.5, 2.5, -0.5] * (dim // 4))  # ties
    return w


def _fbgemm_round_trip(w: torch.Tensor, bits: int) -> torch.Tensor:
    rows = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(rows, bits)


def test_kernels_build_here():
    # where there is a C compiler the kernels must build: the fast path is the one tested
    require_c_compiler()
    assert native.enabled()
    assert native.library_path().exists()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [8, 16, 24, 64])
def test_rowwise_kernel_equals_fbgemm(bits, dim):
    if not can_pack(dim, bits, "row"):
        pytest.skip("FBGEMM cannot pack this row")
    w = _hard_rows(dim=dim, seed=bits + dim)
    reference = _fbgemm_round_trip(w, bits)
    out = w.clone()
    assert native.fake_quantize_rowwise_(out, bits) is out
    assert torch.equal(out, reference)
    assert torch.equal(fake_quant.fake_quantize_rowwise_(w.clone(), bits), reference)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_tablewise_kernel_equals_torch(bits):
    w = _hard_rows(seed=bits)[12:]  # finite, moderate table
    w = w / w.abs().max() * 3.0
    scale = table_scale(w[: len(w) // 2], bits)  # half the table: the rest clips
    expected = fake_quantize_tablewise(w, scale, bits)
    assert torch.equal(native.fake_quantize_tablewise_(w.clone(), scale, bits), expected)
    assert torch.equal(fake_quant.fake_quantize_tablewise_(w.clone(), scale, bits), expected)


def test_non_contiguous_rows_take_the_torch_path():
    w = _hard_rows(dim=32)[:, ::2]  # a strided view: the kernel cannot take it
    expected = _fbgemm_round_trip(w.contiguous(), 4)
    assert torch.equal(native.fake_quantize_rowwise_(w.clone(), 4), expected)


def test_kernel_write_is_seen_by_autograd():
    w = torch.randn(8, 16)
    version = w._version
    native.fake_quantize_rowwise_(w, 4)
    assert w._version > version


def test_unbuildable_kernels_warn_and_fall_back(monkeypatch, tmp_path, caplog):
    require_c_compiler()  # it ends by checking that the real kernels load again
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native._kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="compress.quant.native"):
            assert not native.enabled()  # a log record (the Python API prints nothing)
        assert "no-such-compiler" in caplog.text
        w = _hard_rows()
        assert torch.equal(native.fake_quantize_rowwise_(w.clone(), 4), _fbgemm_round_trip(w, 4))
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    finally:
        monkeypatch.undo()
        native._kernels.cache_clear()
    assert native.enabled()


def test_switch_off(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native._kernels.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an explicit opt-out is not worth a warning
            assert not native.enabled()
    finally:
        monkeypatch.undo()
        native._kernels.cache_clear()


def test_compiler_error_names_the_file(monkeypatch, tmp_path):
    require_c_compiler()
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "SOURCE", bad)
    with pytest.raises(native.NativeUnavailable, match="broken.c"):
        native.build()
    assert not any((tmp_path / "cache").iterdir())


def test_without_a_c_compiler_kernel_tests_skip_and_qat_falls_back(monkeypatch, tmp_path, caplog):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no cc anywhere
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))  # no library built before
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    assert native.find_compiler() is None
    with pytest.raises(pytest.skip.Exception, match="no C compiler found"):
        require_c_compiler()
    with pytest.raises(native.NativeUnavailable, match=r"no C compiler found \('cc'"):
        native.build()
    assert not (tmp_path / "cache").exists()  # nothing half-built
    native._kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="compress.quant.native"):
            assert not native.enabled()
        assert "no C compiler found" in caplog.text
        w = _hard_rows()
        for bits in (8, 4, 2):  # QAT's quantizers give FBGEMM's values on the PyTorch path
            assert torch.equal(
                native.fake_quantize_rowwise_(w.clone(), bits), _fbgemm_round_trip(w, bits)
            )
        with pytest.raises(native.NativeUnavailable, match="off or could not be built"):
            native.blocks_build(w, 16)  # the scale tracker is simply not used
    finally:
        monkeypatch.undo()
        native._kernels.cache_clear()
