"""Aggregators by name, as timm's ``create_model``: ``create_model("abmil", in_dim=1024, n_outputs=2)``.

Each model family lives in its own module and registers its constructors with :func:`register_model`,
declaring what it needs: its settings class (the ``model`` config section), and for a training-time
wrapper such as MHIM-MIL the plain model it wraps (the workflow trains that baseline first and its
``best.pt`` starts the wrapper) and the further inputs it takes (``mhim`` settings, the task's instance
saliency). The training loop and the workflow read these declarations; nothing branches on a model's name.
Families register by plain imports of their modules, as timm's do: every module of this package is
imported on first use, so a new family is one new file (``pathmil/models/NAME.py``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pathmil.errors import PathmilError
from pathmil.models.base import MILModel
from pathmil.settings import Settings

# Inputs a model may take besides its settings (``ModelEntry.inputs``): the ``mhim`` section of a training
# run, the task's instance saliency function (MHIM-MIL v2's class-aware instance score), the function
# that loads a trained run (``pathmil.training.run.load_run``, bound to the task) for a wrapper's baseline,
# and the source models of knowledge transfer (``train.sources``: packages or checkpoints, MoE-PKT's frozen
# experts).
INPUTS = ("mhim", "saliency", "load_baseline", "sources")


@dataclass(frozen=True)
class ModelEntry:
    """A registered aggregator: how to build it and what it needs.

    ``build(in_dim, n_outputs, settings, **inputs) -> MILModel``; ``settings`` is the family's
    :class:`~pathmil.settings.Settings` class (the ``model`` section); ``wraps`` names the plain model a
    wrapper starts from (trained first, on the same fold); ``inputs`` lists what else it takes (see
    :data:`INPUTS`).
    """

    name: str
    build: Callable[..., MILModel]
    settings: type[Settings]
    wraps: str | None = None
    inputs: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, settings: type[Settings], wraps: str | None = None, inputs: tuple[str, ...] = ()
) -> Callable[[Callable[..., MILModel]], Callable[..., MILModel]]:
    """Decorator: register ``fn(in_dim, n_outputs, settings, **inputs) -> MILModel`` under ``name``."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise ValueError(f"model {name!r} asks for unknown inputs {unknown}; known: {INPUTS}")

    def decorate(fn: Callable[..., MILModel]) -> Callable[..., MILModel]:
        if name in _REGISTRY and _REGISTRY[name].build is not fn:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, settings, wraps, tuple(inputs))
        return fn

    return decorate


def _load_all() -> None:
    """Import every module of pathmil.models (each family registers itself when imported)."""
    import pathmil.models as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.ispkg and not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of aggregator ``name``.

    Raises:
        PathmilError: no aggregator of that name (the message lists the registered ones).
    """
    _load_all()
    if name not in _REGISTRY:
        raise PathmilError(f"unknown aggregator '{name}'; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def baselines() -> dict[str, str]:
    """Wrapper -> the plain model it starts from (``{"mhim_abmil": "abmil", ...}``)."""
    _load_all()
    return {name: entry.wraps for name, entry in sorted(_REGISTRY.items()) if entry.wraps}


def model_settings(name: str, settings: dict[str, Any] | None = None) -> Settings:
    """The validated settings of aggregator ``name`` (the ``model`` section); one line per bad key."""
    return model_entry(name).settings.build(settings, "model")


def create_model(name: str, in_dim: int, n_outputs: int, **settings: Any) -> MILModel:
    """Build aggregator ``name`` for ``in_dim``-d features and ``n_outputs`` outputs.

    ``settings`` are its ``model`` settings, plus the inputs its entry declares (``mhim=``, ``saliency=``).

    Raises:
        PathmilError: an unknown aggregator, or a setting it does not declare, or a bad value of one.
    """
    entry = model_entry(name)
    inputs = {key: settings.pop(key) for key in entry.inputs if key in settings}
    return entry.build(in_dim, n_outputs, model_settings(name, settings), **inputs)
