"""Export compressed models: packed tables, ONNX graphs, runtime loaders.

The serving entry points are importable from the package itself, and each is imported on first
use, so importing one submodule does not import the others:

- ``from exporters import Predictor``: serve an artifact directory with ONNX Runtime
  (:mod:`exporters.runtime.predictor`).
- ``from exporters import load_torchrec_model``: an artifact directory back as a TorchRec DLRM
  (:mod:`exporters.runtime.torchrec_model`).
- ``from exporters import quantized_ebc_from_artifacts``: row-wise tables as TorchRec's quantized
  ``EmbeddingBagCollection`` (:mod:`exporters.runtime.torchrec_ebc`).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# the library prints nothing: records reach a terminal only where logging is configured
logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "Predictor": "exporters.runtime.predictor",
    "load_torchrec_model": "exporters.runtime.torchrec_model",
    "quantized_ebc_from_artifacts": "exporters.runtime.torchrec_ebc",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
