"""Instance regressor after WeakSTIL (Schirris et al., "WeakSTIL: weak whole-slide image level stromal
tumor infiltrating lymphocyte scores are all you need", SPIE Medical Imaging 2022).

Each tile gets its own prediction from a small MLP and the bag prediction is their mean, trained on the
slide-level label alone. The per-tile predictions are the instance scores, so a heatmap shows the
predicted sTIL density tile by tile. With more than one output (e.g. class logits) the same rule gives
mean-of-instance-logits MIL; the instance score is then the mean over outputs.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pathmil.models.base import MILModel, MILOutput
from pathmil.models.registry import register_model
from pathmil.settings import Settings


class InstanceRegressorConfig(Settings):
    """The instance regressor's settings (the ``model`` section)."""

    section = "model"
    hidden: int = Field(256, ge=1, description="width of the per-tile MLP")
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout after the embedding")


class InstanceRegressor(MILModel):
    """Per-tile MLP head, averaged over the real instances of the bag."""

    def __init__(self, in_dim: int, n_outputs: int, config: InstanceRegressorConfig | None = None):
        super().__init__(in_dim, n_outputs)
        c = config or InstanceRegressorConfig()
        self.encoder = nn.Sequential(nn.Linear(in_dim, c.hidden), nn.ReLU(), nn.Dropout(c.dropout))
        self.classifier = nn.Linear(c.hidden, n_outputs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        h = self.encoder(x)
        per_instance = self.classifier(h)  # B x N x C
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
        weights = valid.to(h.dtype) / valid.sum(dim=1, keepdim=True).clamp(min=1)
        logits = torch.einsum("bn,bnc->bc", weights, per_instance)
        z = torch.einsum("bn,bnh->bh", weights, h)
        scores = per_instance.mean(dim=-1).masked_fill(~valid, 0.0)
        return MILOutput(logits=logits, embedding=z, instance_scores=scores, instance_embeddings=h)


@register_model("instance_regressor", settings=InstanceRegressorConfig)
def instance_regressor(in_dim: int, n_outputs: int, settings: InstanceRegressorConfig) -> InstanceRegressor:
    return InstanceRegressor(in_dim, n_outputs, settings)
