"""Compression methods for tables and MLPs: QAT and quantized modules, ROBE-Z sharing, applying a plan."""
