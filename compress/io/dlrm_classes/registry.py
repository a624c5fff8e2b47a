"""The registered DLRM classes, by name: every question about a model class goes through here.

:func:`strategy_for` answers for a class name (a spec's ``model_class``), :func:`detect` for a
state dict, :func:`strategy_of_module` for a live module. A name no strategy is registered under
is an :class:`UnknownModelClassError` that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from compress.errors import CheckpointError, DqrmError
from compress.io.dlrm_classes.base import DLRMClass

if TYPE_CHECKING:
    import torch
    from torch import nn

_REGISTRY: dict[str, DLRMClass] = {}
#: The name of the class a state dict that no class claims is taken for (at most one; none:
#: such a state dict is refused).
_FALLBACK: list[str] = []


class UnknownModelClassError(DqrmError, ValueError):
    """A model class no strategy is registered for (the message lists the known ones)."""


def register(strategy: DLRMClass, *, fallback: bool = False) -> DLRMClass:
    """Register ``strategy`` under its ``name`` (a name registered twice is a ``ValueError``).
    ``fallback``: the class a state dict is taken for when no registered class claims it (one)."""
    if strategy.name in _REGISTRY:
        raise ValueError(f"model class {strategy.name!r} is already registered")
    if fallback and _FALLBACK:
        raise ValueError(f"{strategy.name}: {_FALLBACK[0]} is already the fallback class")
    _REGISTRY[strategy.name] = strategy
    if fallback:
        _FALLBACK.append(strategy.name)
    return strategy


def unregister(name: str) -> None:
    """Remove the strategy registered under ``name`` (for tests and plug-ins)."""
    strategy_for(name)
    del _REGISTRY[name]
    if name in _FALLBACK:
        _FALLBACK.remove(name)


def known_classes() -> tuple[str, ...]:
    """The registered class names, in registration order."""
    return tuple(_REGISTRY)


def strategy_for(name: str) -> DLRMClass:
    """The strategy of class ``name``; :class:`UnknownModelClassError` listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownModelClassError(
            f"unknown model class {name!r}; known classes: {', '.join(_REGISTRY)}"
        ) from None


def detect(
    sd: Mapping[str, torch.Tensor], source: str = "state dict", preferred: str | None = None
) -> DLRMClass:
    """The class of a (prefix-free) DLRM state dict: ``preferred`` (a model config's class) when
    it claims the interaction keys, else the first registered class that claims them, else the
    fallback class (``source`` names the checkpoint in the error raised when there is none)."""
    claiming = [s for s in _REGISTRY.values() if s.claims(sd)]
    for strategy in claiming:
        if strategy.name == preferred:
            return strategy
    if claiming:
        return claiming[0]
    if not _FALLBACK:
        raise CheckpointError(
            f"{source}: the interaction is none of the known classes ({', '.join(_REGISTRY)})"
        )
    return _REGISTRY[_FALLBACK[0]]


def strategy_of_module(module: nn.Module) -> DLRMClass:
    """The strategy of a live DLRM module: the most derived registered ``module_type`` it is an
    instance of (``DLRM_DCN`` subclasses ``DLRM``); :class:`CheckpointError` when none."""
    matches = [s for s in _REGISTRY.values() if isinstance(module, s.module_type)]
    if not matches:
        raise CheckpointError(
            f"a {type(module).__name__} module is not a TorchRec DLRM "
            f"({', '.join(_REGISTRY)} or DLRMTrain)"
        )
    return max(matches, key=lambda s: len(s.module_type.__mro__))
