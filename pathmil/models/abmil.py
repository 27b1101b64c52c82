"""Attention-based MIL (Ilse, Tomczak and Welling, "Attention-based Deep Multiple Instance Learning",
ICML 2018), plain and gated.

Instances are embedded, h_k = ReLU(W x_k); attention a_k = softmax_k(w^T tanh(V h_k)) or, gated,
softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))); the bag is z = sum_k a_k h_k and the head is linear. The
attention weights are the instance scores: they say which tiles the bag prediction rests on, they are
painted in heatmaps, and MHIM-MIL's teacher ranks instances by them.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pathmil.models.base import MILModel, MILOutput, masked_softmax
from pathmil.models.registry import register_model
from pathmil.settings import Settings


class ABMILConfig(Settings):
    """ABMIL's settings (the ``model`` section of ``--aggregator abmil``)."""

    section = "model"
    hidden: int = Field(512, ge=1, description="width of the instance embedding h_k = ReLU(W x_k)")
    attention_hidden: int = Field(128, ge=1, description="hidden size of the attention network")
    gated: bool = Field(False, description="gated attention: tanh(V h) * sigmoid(U h)")
    dropout: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="dropout after the embedding, and in the attention unless attention_dropout",
    )
    attention_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="dropout in the attention network; none: dropout's (CLAM's 0.25; Ilse et al. and the "
        "MHIM-MIL code use 0)",
    )


class GatedABMILConfig(ABMILConfig):
    """Gated ABMIL's settings (``--aggregator abmil_gated``): ABMIL's with gated attention on."""

    gated: bool = Field(True, description="gated attention: tanh(V h) * sigmoid(U h)")


class AttentionPool(nn.Module):
    """Ilse et al.'s attention scoring, plain or gated; returns unnormalised scores (B x N)."""

    def __init__(self, dim: int, hidden: int = 128, gated: bool = False, dropout: float = 0.0):
        super().__init__()
        self.tanh_branch = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.gate_branch = (
            nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        )
        self.score = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.tanh_branch(h)
        if self.gate_branch is not None:
            a = a * self.gate_branch(h)
        return self.score(a).squeeze(-1)


class ABMIL(MILModel):
    """Attention MIL: instance MLP, (gated) attention pooling, linear head."""

    def __init__(self, in_dim: int, n_outputs: int, config: ABMILConfig | None = None):
        super().__init__(in_dim, n_outputs)
        c = config or ABMILConfig()
        self.encoder = nn.Sequential(nn.Linear(in_dim, c.hidden), nn.ReLU(), nn.Dropout(c.dropout))
        self.attention = AttentionPool(
            c.hidden,
            c.attention_hidden,
            gated=c.gated,
            dropout=c.dropout if c.attention_dropout is None else c.attention_dropout,
        )
        self.classifier = nn.Linear(c.hidden, n_outputs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Instance embeddings h_k = ReLU(W x_k) (B, N, hidden)."""
        return self.encoder(x)

    def aggregate(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Attention pooling of embedded instances and the head (MHIM-MIL calls the two halves apart)."""
        weights = masked_softmax(self.attention(h), mask)  # B x N
        z = torch.einsum("bn,bnh->bh", weights, h)
        return MILOutput(
            logits=self.classifier(z), embedding=z, instance_scores=weights, instance_embeddings=h
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        return self.aggregate(self.embed(x), mask)


@register_model("abmil", settings=ABMILConfig)
def abmil(in_dim: int, n_outputs: int, settings: ABMILConfig) -> ABMIL:
    return ABMIL(in_dim, n_outputs, settings)


@register_model("abmil_gated", settings=GatedABMILConfig)
def abmil_gated(in_dim: int, n_outputs: int, settings: GatedABMILConfig) -> ABMIL:
    return ABMIL(in_dim, n_outputs, settings)
