"""MambaMIL (Yang et al., "MambaMIL: Enhancing Long Sequence Modeling with Sequence Reordering in
Computational Pathology", MICCAI 2024): a bag of instance features as one long sequence for Mamba.

Linear(D, 512) + GELU + dropout; ``n_layers`` pre-norm residual layers ``h <- h + SRMamba(LayerNorm(h))``
(or plain / bidirectional Mamba); LayerNorm; attention pooling (512 -> 128, tanh, -> 1) whose softmax
weights are the instance scores; Linear(512, C). Module names follow the authors' code (``_fc1``,
``layers.i.0`` norm, ``layers.i.1`` block, ``norm``, ``attention``, ``classifier``) so their checkpoints
load. As there, the head's linear layers start Xavier-normal with zero bias; the Mamba blocks keep
mamba-ssm's initialisation (the authors' blanket re-initialisation also zeroed dt_proj's bias).

Padding: a bag's instances are its sequence, so padded positions must not enter the scans at all (they
would shift the SR order and feed the causal scan). With a mask, each bag runs alone on its real
instances; outputs at padded positions are zero and get zero attention.

Token reordering (``token_reorder``, after Vo et al., "Demystifying the Token Dynamics of Deep Selective
State Space Models", ICLR 2025): instances are sorted by a learned linear importance score, most important
last, before the Mamba layers and put back in their original order after them. Vo et al. relax the sort
with SoftSort, an N x N matrix, impossible for 10^5 instances; here the sort is hard and the score learns
through a straight-through factor ``1 + s - stopgrad(s)`` on each sorted token (value 1, gradient
``<token, dLoss/dtoken>``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pathmil.errors import PathmilError
from pathmil.models.base import MILModel, MILOutput, masked_softmax
from pathmil.models.mamba import BiMamba, Mamba, SRMamba
from pathmil.models.registry import register_model
from pathmil.settings import Settings


class MambaMILConfig(Settings):
    """MambaMIL's settings (Yang et al., MICCAI 2024): the ``model`` section for ``--aggregator mambamil``.

    The defaults are the paper's; the authors' scripts use ``sr_rate: 5``.
    """

    section = "model"
    d_model: int = Field(512, ge=1, description="width after the input projection")
    n_layers: int = Field(2, ge=1, description="Mamba layers, each h <- h + block(LayerNorm(h))")
    d_state: int = Field(16, ge=1, description="state size per channel of the selective scan")
    d_conv: int = Field(4, ge=1, description="width of the causal depthwise convolution")
    expand: int = Field(2, ge=1, description="d_inner = expand * d_model")
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout after the input projection")
    variant: Literal["sr", "plain", "bi"] = Field(
        "sr", description="sr (SR-Mamba), plain (Mamba) or bi (bidirectional Mamba)"
    )
    sr_rate: int = Field(10, ge=1, description="SR-Mamba's reordering stride R")
    token_reorder: bool = Field(
        False, description="sort instances by a learned importance score first (Vo et al., ICLR 2025)"
    )
    attn_dim: int = Field(128, ge=1, description="hidden size of the attention pooling")
    backend: Literal["auto", "torch", "cuda"] = Field(
        "auto", description="selective scan: auto (mamba-ssm kernels on a GPU if installed), torch or cuda"
    )


class MambaMIL(MILModel):
    """The MambaMIL aggregator; see the module docstring. ``forward(x (B, N, D), mask (B, N))``."""

    def __init__(self, in_dim: int, n_outputs: int, config: MambaMILConfig | None = None):
        super().__init__(in_dim, n_outputs)
        config = config or MambaMILConfig()
        self.config = config
        width = config.d_model
        self._fc1 = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Dropout(config.dropout))
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), _make_block(config)) for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.attention = nn.Sequential(
            nn.Linear(width, config.attn_dim), nn.Tanh(), nn.Linear(config.attn_dim, 1)
        )
        self.classifier = nn.Linear(width, n_outputs)
        self.importance = nn.Linear(width, 1) if config.token_reorder else None
        for module in [self._fc1, self.attention, self.classifier, self.importance]:
            for layer in module.modules() if module is not None else []:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_normal_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        x = x.to(self.classifier.weight.dtype)
        if mask is None or bool(mask.all()):
            return self._pool(self._sequence(x), None)
        if not bool(mask.any(dim=1).all()):
            raise PathmilError("a bag has no instances (its mask is all False); drop empty bags first")
        parts = [self._sequence(x[b : b + 1, mask[b]])[0] for b in range(x.shape[0])]
        h = torch.zeros(*mask.shape, parts[0].shape[-1], dtype=parts[0].dtype, device=x.device)
        h = h.masked_scatter(mask[..., None], torch.cat(parts))
        return self._pool(h, mask)

    def _sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Per-instance features ``(B, N, d_model)`` of unpadded bags of equal length."""
        h = self._fc1(x)
        if self.importance is not None:
            h, back = self._sort_by_importance(h)
        for norm, block in self.layers:
            h = h + block(norm(h))
        h = self.norm(h)
        if self.importance is not None:
            h = h.gather(1, back[..., None].expand_as(h))
        return h

    def _sort_by_importance(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sort instances by ascending learned importance; returns the sorted tokens and the way back."""
        score = self.importance(h).squeeze(-1)
        order = torch.argsort(score.detach(), dim=1, stable=True)
        back = torch.argsort(order, dim=1)
        s = score.gather(1, order)
        h = h.gather(1, order[..., None].expand_as(h)) * (1 + s - s.detach())[..., None]
        return h, back

    def _pool(self, h: torch.Tensor, mask: torch.Tensor | None) -> MILOutput:
        weights = masked_softmax(self.attention(h).squeeze(-1), mask)
        embedding = torch.einsum("bn,bne->be", weights, h)
        return MILOutput(
            logits=self.classifier(embedding),
            embedding=embedding,
            instance_scores=weights,
            instance_embeddings=h,
        )


def _make_block(config: MambaMILConfig) -> Mamba:
    kwargs = {
        "d_state": config.d_state,
        "d_conv": config.d_conv,
        "expand": config.expand,
        "backend": config.backend,
    }
    if config.variant == "sr":
        return SRMamba(config.d_model, rate=config.sr_rate, **kwargs)
    if config.variant == "bi":
        return BiMamba(config.d_model, **kwargs)
    return Mamba(config.d_model, **kwargs)


@register_model("mambamil", settings=MambaMILConfig)
def mambamil(in_dim: int, n_outputs: int, settings: MambaMILConfig) -> MambaMIL:
    """MambaMIL with the settings of the ``model`` config section (:class:`MambaMILConfig`)."""
    return MambaMIL(in_dim, n_outputs, settings)
