"""Export compressed models: packed tables, ONNX graphs, runtime loaders.

``from exporters import load_torchrec_model`` (:mod:`exporters.runtime.torchrec_model`): an artifact
directory back as a TorchRec DLRM. It is imported on first use, so importing one submodule does
not import the others.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_torchrec_model"]


def __getattr__(name: str) -> Any:
    if name == "load_torchrec_model":
        from exporters.runtime.torchrec_model import load_torchrec_model

        return load_torchrec_model
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
