"""DSMIL: dual-stream MIL (Li, Li and Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole
Slide Image Classification with Self-supervised Contrastive Learning", CVPR 2021).

Two streams over the instances x_i of a bag. The instance stream scores each instance per output,
s_i = W x_i, and takes the critical instance m_c = argmax_i s_i[c] of every output c (max pooling). The bag
stream embeds queries q_i = Q(x_i) and values v_i = V(x_i), attends from each critical instance to every
instance, a_{i,c} = softmax_i(<q_i, q_{m_c}> / sqrt(d)), pools b_c = sum_i a_{i,c} v_i, and reads the C
pooled vectors with a 1-D convolution over them to one bag score per output. The model's logits are the
mean of the two streams' scores (the authors train on both and predict with their mean). Instance scores
are the attention of the output the bag leans to most.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from pathmil.models.base import MILModel, MILOutput
from pathmil.models.registry import register_model
from pathmil.settings import Settings


class DSMILConfig(Settings):
    """DSMIL's settings (the ``model`` section of ``--aggregator dsmil``)."""

    section = "model"
    hidden: int = Field(512, ge=1, description="width of the instance embedding")
    query_dim: int = Field(128, ge=1, description="width of the queries q_i")
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout of the embedding and the values")


class DSMIL(MILModel):
    """Instance classifier + critical-instance attention; ``forward(x (B, N, D), mask (B, N))``."""

    output_layers = ("instance_classifier", "bag_classifier")

    def __init__(self, in_dim: int, n_outputs: int, config: DSMILConfig | None = None):
        super().__init__(in_dim, n_outputs)
        c = config or DSMILConfig()
        self.encoder = nn.Sequential(nn.Linear(in_dim, c.hidden), nn.ReLU(), nn.Dropout(c.dropout))
        self.instance_classifier = nn.Linear(c.hidden, n_outputs)
        self.query = nn.Sequential(
            nn.Linear(c.hidden, c.query_dim), nn.ReLU(), nn.Linear(c.query_dim, c.query_dim), nn.Tanh()
        )
        self.value = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(c.hidden, c.hidden))
        self.bag_classifier = nn.Conv1d(n_outputs, n_outputs, kernel_size=c.hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        h = self.encoder(x)  # B x N x H
        scores = self.instance_classifier(h)  # B x N x C
        if mask is not None:
            scores = scores.masked_fill(~mask[..., None], torch.finfo(scores.dtype).min)
        instance_logits, critical = scores.max(dim=1)  # B x C: max pooling, and the critical instances
        q, v = self.query(h), self.value(h)  # B x N x Q, B x N x H
        q_critical = torch.gather(q, 1, critical[..., None].expand(-1, -1, q.shape[-1]))  # B x C x Q
        attention = torch.einsum("bnq,bcq->bnc", q, q_critical) / math.sqrt(q.shape[-1])
        if mask is not None:
            attention = attention.masked_fill(~mask[..., None], torch.finfo(attention.dtype).min)
        attention = torch.softmax(attention, dim=1)  # over the instances, per output
        if mask is not None:
            attention = attention * mask[..., None]
        pooled = torch.einsum("bnc,bnh->bch", attention, v)  # B x C x H
        bag_logits = self.bag_classifier(pooled).squeeze(-1)  # B x C
        logits = 0.5 * (instance_logits + bag_logits)
        leaning = logits.argmax(dim=1)  # the output the bag leans to most
        shown = torch.gather(attention, 2, leaning[:, None, None].expand(-1, attention.shape[1], 1)).squeeze(
            -1
        )
        return MILOutput(
            logits=logits, embedding=pooled.mean(dim=1), instance_scores=shown, instance_embeddings=h
        )


@register_model("dsmil", settings=DSMILConfig)
def dsmil(in_dim: int, n_outputs: int, settings: DSMILConfig) -> DSMIL:
    return DSMIL(in_dim, n_outputs, settings)
