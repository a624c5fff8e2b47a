"""Quantization math: pure functions on tensors (FBGEMM row formats, DQRM table-wise rule) and native kernels."""
