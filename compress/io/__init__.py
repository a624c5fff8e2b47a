"""Checkpoint -> model: read checkpoints safely, infer the architecture, rebuild the TorchRec DLRM."""
