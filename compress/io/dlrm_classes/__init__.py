"""One strategy object per TorchRec DLRM class, registered by class name.

A strategy (:class:`~compress.io.dlrm_classes.base.DLRMClass`) is the one place that knows a
class: its interaction's state-dict keys, how its shape is inferred from a state dict, its
model-config keys (``config_keys``, read by :mod:`compress.io.model_config`), its TorchRec
constructor, its interaction and over-arch widths, its linear and cross layers, the name of its
graph interaction (built by :mod:`exporters.onnx.dense`), its dummy inputs and its parity
tolerance. The keys every class shares (tables, bottom and top MLPs, the ``DLRMTrain`` prefix) are
in :mod:`~compress.io.dlrm_classes.base`. Everything else asks :func:`strategy_for`.

Built in: ``DLRM`` (:mod:`.dlrm`), ``DLRM_DCN`` (:mod:`.dlrm_dcn`), ``DLRM_Projection``
(:mod:`.dlrm_projection`). Adding a class is one subclass and one registration::

    class WideDLRM(DotDLRM):
        name = "WideDLRM"
        module_type = WideDLRMModule      # a torch module with the DLRM constructor

    register(WideDLRM())
"""

from __future__ import annotations

from compress.io.dlrm_classes.base import DLRMClass
from compress.io.dlrm_classes.dlrm import DotDLRM
from compress.io.dlrm_classes.dlrm_dcn import DCNDLRM
from compress.io.dlrm_classes.dlrm_projection import ProjectionDLRM
from compress.io.dlrm_classes.registry import (
    UnknownModelClassError,
    detect,
    known_classes,
    register,
    strategy_for,
    strategy_of_module,
    unregister,
)

register(DotDLRM(), fallback=True)
register(DCNDLRM())
register(ProjectionDLRM())

__all__ = [
    "DLRMClass",
    "UnknownModelClassError",
    "detect",
    "known_classes",
    "register",
    "strategy_for",
    "strategy_of_module",
    "unregister",
]
