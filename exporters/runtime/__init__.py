"""Serving artifacts: ONNX Runtime Predictor and TorchRec loaders."""
