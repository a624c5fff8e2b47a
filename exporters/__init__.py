"""Export compressed models: packed tables, ONNX graphs, runtime loaders."""
