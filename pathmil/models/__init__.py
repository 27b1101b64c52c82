"""MIL aggregators and their registry: ``create_model(name, in_dim, n_outputs, **settings)``."""

from pathmil.models.base import MILModel, MILOutput
from pathmil.models.registry import create_model, list_models, register_model

__all__ = ["MILModel", "MILOutput", "create_model", "list_models", "register_model"]
