"""Aggregators by name, as timm's ``create_model``: ``create_model("abmil", in_dim=1024, n_outputs=2)``.

Each model family lives in its own module and registers its constructors with :func:`register_model`;
the modules are imported on first use so that listing or creating models needs no other import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pathmil.errors import PathmilError
from pathmil.models.base import MILModel

# Modules that register models when imported (one per model family).
MODEL_MODULES = [
    "pathmil.models.pooling",
    "pathmil.models.abmil",
    "pathmil.models.instance",
    "pathmil.models.transmil",
    "pathmil.models.mhim",
    "pathmil.models.mambamil",
]

_REGISTRY: dict[str, Callable[..., MILModel]] = {}


def register_model(name: str) -> Callable[[Callable[..., MILModel]], Callable[..., MILModel]]:
    """Decorator: register a constructor ``fn(in_dim, n_outputs, **settings) -> MILModel`` under ``name``."""

    def decorate(fn: Callable[..., MILModel]) -> Callable[..., MILModel]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorate


def _load_all() -> None:
    for module in MODEL_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def create_model(name: str, in_dim: int, n_outputs: int, **settings: Any) -> MILModel:
    """Build aggregator ``name``; ``settings`` are its keyword arguments (from the ``model`` config section)."""
    _load_all()
    if name not in _REGISTRY:
        raise PathmilError(f"unknown aggregator '{name}'; choose one of {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](in_dim=in_dim, n_outputs=n_outputs, **settings)
    except TypeError as err:
        raise PathmilError(f"aggregator '{name}': bad setting ({err})") from None
