"""MoE-PKT: prognostic knowledge transfer by a mixture of experts over frozen source models (Liu et al.,
"Towards Understanding and Harnessing the Transferability of Prognostic Knowledge in Computational
Pathology", 2025, Path-PKT).

A small target cohort borrows from models trained on larger ones. Each source model (a trained pathmil
model: a package's fold models, a run or a checkpoint, ``train.sources``) stays frozen and embeds the
target bag: e_s = source_s(x).embedding, its bag representation before its head. An expert MLP per source
maps e_s into a shared space, E_s(e_s) = Dropout(ReLU(W_s e_s)) (``hidden`` wide). A router reads the bag
itself: gated attention MIL over the instances (h_k = ReLU(W x_k), a = softmax_k(w^T (tanh(V h_k) *
sigmoid(U h_k))), r = sum_k a_k h_k), then a linear map to one logit per expert, l = R r, softmax p, and the
top-k experts (``top_k``, 5 in the paper; all of them when there are fewer) share the bag: g_i = p_i /
sum_{j in top-k} p_j for the chosen experts, 0 for the others, so the weights sum to one. The bag embedding
is z = sum_i g_i E_i(e_i) and the head is linear. With ``self_expert`` the router's own bag embedding r is
one more expert, learnt from the target cohort alone (the paper adds a target model's embedding the same
way); without it and with one source, MoE-PKT is a head (expert MLP + linear) fine-tuned on that source's
embeddings.

Two auxiliary losses keep the router healthy (``aux_loss``, training only), with the paper's weights 0.01:

- load balancing (Fedus et al., Switch Transformers, JMLR 2022): K sum_i f_i P_i over the bags of a
  forward pass, f_i the share of (bag, slot) assignments that go to expert i, P_i its mean router
  probability; 1 when balanced, K when one expert takes everything;
- router z-loss (Zoph et al., ST-MoE, 2022): the mean of logsumexp(l)^2, which keeps the router logits
  small and the softmax well-conditioned.

The training loop forwards one bag at a time, so the balance term sees one bag per call and pushes each
bag's router away from putting all its mass on its top experts.

The router's attention weights are the instance scores (heatmaps). A checkpoint keeps the source models'
architectures (:meth:`MoEPKT.checkpoint_inputs`) and their weights (in the state dict), so a trained
MoE-PKT predicts from its checkpoint alone, without the source packages.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from pydantic import Field
from torch import nn

from pathmil.errors import PathmilError
from pathmil.models.abmil import AttentionPool
from pathmil.models.base import MILModel, MILOutput, masked_softmax
from pathmil.models.checkpoint import model_checkpoints
from pathmil.models.registry import create_model, model_entry, register_model
from pathmil.settings import Settings

log = logging.getLogger(__name__)


class MoEPKTConfig(Settings):
    """MoE-PKT's settings (the ``model`` section of ``--aggregator moe_pkt``); defaults as Path-PKT's."""

    section = "model"
    hidden: int = Field(512, ge=1, description="width of the experts' outputs and of the router's embedding")
    attention_hidden: int = Field(384, ge=1, description="hidden size of the router's attention network")
    gated: bool = Field(True, description="gated attention in the router")
    top_k: int = Field(5, ge=1, description="experts that share each bag (all of them when there are fewer)")
    self_expert: bool = Field(
        True, description="the router's own embedding of the bag is one more (trainable) expert"
    )
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout in the experts and the router")
    balance_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss")
    z_weight: float = Field(0.01, ge=0, description="weight of the router z-loss")


# ------------------------------------------------------------------------------------------- sources


def source_spec(name: str, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What rebuilds a source model (plain data, kept in MoE-PKT's checkpoints): its aggregator and model
    settings, input and output sizes, and how its training features were made."""
    return {
        "name": name,
        "aggregator": str(checkpoint["aggregator"]),
        "model_settings": dict(checkpoint["config"].get("model") or {}),
        "in_dim": int(checkpoint["in_dim"]),
        "n_outputs": int(checkpoint["n_outputs"]),
        "features": dict(checkpoint.get("features") or {}),
    }


def build_source(spec: dict[str, Any], weights: dict[str, torch.Tensor] | None = None) -> MILModel:
    """The model a source predicts with, frozen: the aggregator itself, or a training-time wrapper's
    student (MHIM-MIL predicts with its student alone); ``weights`` from its checkpoint if given.

    Raises:
        PathmilError: a source that is itself a transfer model, or weights that do not fit.
    """
    entry = model_entry(spec["aggregator"])
    if "sources" in entry.inputs:
        raise PathmilError(
            f"source {spec['name']} is a {spec['aggregator']} model; use the models it was built from as sources"
        )
    name = entry.wraps or spec["aggregator"]
    model = create_model(name, in_dim=spec["in_dim"], n_outputs=spec["n_outputs"], **spec["model_settings"])
    if weights is not None:
        if entry.wraps:
            weights = {k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")}
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise PathmilError(f"source {spec['name']}: weights do not fit {name} ({first})") from None
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_sources(
    sources: list[str | os.PathLike | dict[str, Any]], in_dim: int
) -> tuple[list[dict[str, Any]], list[MILModel]]:
    """Source specs and frozen models: from paths (packages, run folders, checkpoints: with their weights)
    or from specs a checkpoint kept (architecture only; the weights come with the checkpoint's state dict).

    Raises:
        PathmilError: no sources, a source for features of another dimension, or one that cannot be loaded.
    """
    if not sources:
        raise PathmilError("moe_pkt needs source models: set train.sources to packages or checkpoints")
    specs, models = [], []
    for item in sources:
        if isinstance(item, dict):
            loaded = [(item, None)]
        else:
            loaded = [
                (source_spec(str(file), checkpoint), checkpoint["model"])
                for file, checkpoint in model_checkpoints(item)
            ]
        for spec, weights in loaded:
            if spec["in_dim"] != in_dim:
                raise PathmilError(
                    f"source {spec['name']} was trained on {spec['in_dim']}-d features, these bags are "
                    f"{in_dim}-d; use sources trained on features of the same encoder"
                )
            specs.append(spec)
            models.append(build_source(spec, weights))
    return specs, models


@torch.no_grad()
def embedding_dim(model: MILModel, in_dim: int) -> int:
    """The width of a model's bag embedding (one forward pass on a one-instance bag)."""
    return int(model(torch.zeros(1, 1, in_dim)).embedding.shape[-1])


# --------------------------------------------------------------------------------------------- model


class MoEPKT(MILModel):
    """Mixture of expert MLPs over frozen source models' bag embeddings, routed by gated attention MIL."""

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        config: MoEPKTConfig,
        specs: list[dict[str, Any]],
        sources: list[MILModel],
    ):
        super().__init__(in_dim, n_outputs)
        self.config = config
        self.specs = specs
        self.sources = nn.ModuleList(sources)
        c = config
        self.router_encoder = nn.Sequential(nn.Linear(in_dim, c.hidden), nn.ReLU(), nn.Dropout(c.dropout))
        self.router_attention = AttentionPool(c.hidden, c.attention_hidden, gated=c.gated, dropout=c.dropout)
        n_experts = len(sources) + int(c.self_expert)
        self.router = nn.Linear(c.hidden, n_experts)
        widths = [embedding_dim(source, in_dim) for source in sources] + [c.hidden] * int(c.self_expert)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, c.hidden), nn.ReLU(), nn.Dropout(c.dropout)) for width in widths
        )
        self.classifier = nn.Linear(c.hidden, n_outputs)
        self.top_k = min(c.top_k, n_experts)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def train(self, mode: bool = True) -> MoEPKT:
        """The source models stay in eval mode (frozen: no dropout, no statistics updates)."""
        super().train(mode)
        self.sources.eval()
        return self

    def checkpoint_inputs(self) -> dict[str, Any]:
        return {"sources": [dict(spec) for spec in self.specs]}

    def route(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router: (gates (B, K), probabilities (B, K), logits (B, K), attention (B, N), the router's
        bag embedding (B, hidden)). Gates are the top-k probabilities renormalised to sum to one."""
        h = self.router_encoder(x)
        attention = masked_softmax(self.router_attention(h), mask)
        embedding = torch.einsum("bn,bnh->bh", attention, h)
        logits = self.router(embedding)
        probabilities = torch.softmax(logits.float(), dim=-1)
        top, index = probabilities.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probabilities).scatter(-1, index, top / top.sum(-1, keepdim=True))
        return gates, probabilities, logits, attention, embedding

    def expert_inputs(
        self, x: torch.Tensor, mask: torch.Tensor | None, own: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each expert's input: the frozen sources' bag embeddings, then (``self_expert``) the router's."""
        with torch.no_grad():
            inputs = [source(x, mask).embedding.detach() for source in self.sources]
        return inputs + [own] * int(self.config.self_expert)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        gates, probabilities, logits, attention, own = self.route(x, mask)
        outputs = torch.stack(
            [expert(e.to(own.dtype)) for expert, e in zip(self.experts, self.expert_inputs(x, mask, own))],
            dim=1,
        )  # B x K x hidden
        z = torch.einsum("bk,bkh->bh", gates.to(outputs.dtype), outputs)
        aux = self.router_losses(gates, probabilities, logits) if self.training else None
        return MILOutput(logits=self.classifier(z), embedding=z, instance_scores=attention, aux_loss=aux)

    def router_losses(
        self, gates: torch.Tensor, probabilities: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """balance_weight x load balancing + z_weight x router z-loss (module docstring)."""
        chosen = (gates > 0).float()
        share = chosen.sum(0) / chosen.sum()  # f_i: share of the (bag, slot) assignments
        balance = self.n_experts * torch.sum(share * probabilities.mean(0))
        z = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return self.config.balance_weight * balance + self.config.z_weight * z


@register_model("moe_pkt", settings=MoEPKTConfig, inputs=("sources",))
def moe_pkt(in_dim: int, n_outputs: int, settings: MoEPKTConfig, sources: list[Any] | None = None) -> MoEPKT:
    specs, models = load_sources(list(sources or []), in_dim)
    log.info(
        "MoE-PKT: %d source model(s)%s, top-%d routing",
        len(models),
        " and the target's own expert" if settings.self_expert else "",
        min(settings.top_k, len(models) + int(settings.self_expert)),
    )
    return MoEPKT(in_dim, n_outputs, settings, specs, models)
