"""Mean and max pooling: the baselines every MIL paper reports first.

Both embed instances with a small MLP, pool them, and classify the pooled vector. Their instance scores
are what a user would look at: the instance's share of the mean (uniform) and, for max pooling, how often
an instance wins the maximum over embedding dimensions.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pathmil.models.base import MILModel, MILOutput
from pathmil.models.registry import register_model
from pathmil.settings import Settings


class PoolingConfig(Settings):
    """Mean and max pooling's settings (the ``model`` section)."""

    section = "model"
    hidden: int = Field(512, ge=1, description="width of the instance embedding")
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout after the embedding")


class PoolingMIL(MILModel):
    """Instance MLP, then mean or max over the bag, then a linear head."""

    def __init__(self, in_dim: int, n_outputs: int, pool: str, config: PoolingConfig | None = None):
        super().__init__(in_dim, n_outputs)
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
        c = config or PoolingConfig()
        self.pool = pool
        self.encoder = nn.Sequential(nn.Linear(in_dim, c.hidden), nn.ReLU(), nn.Dropout(c.dropout))
        self.classifier = nn.Linear(c.hidden, n_outputs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        h = self.encoder(x)  # B x N x H
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
        if self.pool == "mean":
            weights = valid.to(h.dtype) / valid.sum(dim=1, keepdim=True).clamp(min=1)
            z = torch.einsum("bn,bnh->bh", weights, h)
            scores = weights
        else:
            z, winners = h.masked_fill(~valid[..., None], float("-inf")).max(dim=1)
            z = torch.nan_to_num(z, neginf=0.0)  # an empty bag pools to zeros
            wins = torch.zeros(x.shape[:2], device=x.device).scatter_add_(
                1, winners, torch.ones_like(winners, dtype=torch.float32)
            )
            scores = wins / h.shape[-1]
        return MILOutput(
            logits=self.classifier(z), embedding=z, instance_scores=scores, instance_embeddings=h
        )


@register_model("mean_pool", settings=PoolingConfig)
def mean_pool(in_dim: int, n_outputs: int, settings: PoolingConfig) -> PoolingMIL:
    return PoolingMIL(in_dim, n_outputs, "mean", settings)


@register_model("max_pool", settings=PoolingConfig)
def max_pool(in_dim: int, n_outputs: int, settings: PoolingConfig) -> PoolingMIL:
    return PoolingMIL(in_dim, n_outputs, "max", settings)
