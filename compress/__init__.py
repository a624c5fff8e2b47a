"""dqrm-compress core: checkpoints, recipes, quantizers, QAT, parameter sharing, training, CLI.

The data path reads in one direction: checkpoint (:mod:`compress.io.checkpoint`) -> model
(:mod:`compress.io.model`) -> recipe plan -> compressed model -> artifacts (``exporters``) -> runtime.
The steps never import ``exporters``; the CLI and :func:`compress.run` (:mod:`compress.api`, the
whole job in one call) are the places that use both.

``compress.run`` is imported on first use, so ``import compress`` stays light. The library prints
nothing: it logs to the ``compress`` loggers, which hold a ``NullHandler`` (configure ``logging``
to see their records; the command line shows them as ``--quiet``/``--verbose`` say).
"""

import logging
from typing import Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {"run": "compress.api", "RunResult": "compress.api"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
