"""ONNX graphs of a compressed DLRM: plain-data specs, lookup and dense subgraphs, whole models, parity."""
