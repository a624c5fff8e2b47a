"""Quantization math of dqrm-compress: pure, deterministic functions on torch tensors.

The fake-quant modules, the QAT loop, convert and the exporters are all built on these functions,
so that what a model is trained against is, bit for bit, what gets stored. Apart from
:mod:`~compress.quant.native` (which compiles C), nothing here imports the rest of the project.

- :mod:`~compress.quant.packing`: bit widths, low-bits-first n-bit packing, conversion chunk size.
- :mod:`~compress.quant.fbgemm_rowwise`: FBGEMM's fused n-bit row-wise format (quantize
  chunk by chunk, dequantize, inference-TBE rows, bytes).
- :mod:`~compress.quant.tablewise`: DQRM's symmetric table-wise rule (fp16 scale, packed codes,
  exact conversion to FBGEMM rows, bytes).
- :mod:`~compress.quant.per_channel`: symmetric per-output-channel MLP weights (+ STE).
- :mod:`~compress.quant.fake_quant`: the in-place fake quantizers of QAT lookups (PyTorch).
- :mod:`~compress.quant.native`: the same fake quantizers as compiled C kernels.
"""
