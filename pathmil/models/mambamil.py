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

Token reordering (``token_reorder``, Vo et al., "Demystifying the Token Dynamics of Deep Selective State
Space Models", ICLR 2025): in each layer a learned linear importance score ranks the (normalised) tokens,
the block scans them softly sorted by ascending importance (most important last, nearest the end of the
causal scan) and its outputs go back to their tokens through the transposed relaxed permutation: with P
the SoftSort matrix of the scores (:mod:`pathmil.models.softsort`, temperature ``reorder_tau``),
``h <- h + P^T block(P LayerNorm(h))``. The scores learn through P; on bags longer than
``reorder_window`` + 1 each sorted slot mixes only its ``reorder_window`` nearest ranks on either side.
Vo et al. score tokens by a linear map of the block's step size input and do not put outputs back (their
pooling does not care); here the score reads the block's input and the outputs return to their tiles, so
the residual stream and the heatmaps keep the slide's positions.
``positive_definite`` ties each branch's input and output projections (see :mod:`pathmil.models.mamba`).
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
from pathmil.models.softsort import SoftPermutation
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
        False,
        description="each layer scans its tokens softly sorted by learned importance (Vo et al., ICLR 2025)",
    )
    reorder_tau: float = Field(
        1.0, gt=0, description="SoftSort temperature of token_reorder (-> 0: a hard sort)"
    )
    reorder_window: int = Field(
        64, ge=1, description="SoftSort mixes tokens within this many ranks (exact for bags up to window + 1)"
    )
    positive_definite: bool = Field(
        False, description="S_B = diag(softplus(s)) S_C, so S_C^T S_B >= 0 (Vo et al., ICLR 2025)"
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
        self.importance = (
            nn.ModuleList(nn.Linear(width, 1) for _ in range(config.n_layers))
            if config.token_reorder
            else None
        )
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
        for i, (norm, block) in enumerate(self.layers):
            u = norm(h)
            if self.importance is None:
                h = h + block(u)
                continue
            scores = self.importance[i](u).squeeze(-1)
            relaxed = SoftPermutation(scores, self.config.reorder_tau, self.config.reorder_window)
            h = h + relaxed.unsort(block(relaxed.sort(u)))
        return self.norm(h)

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
        "positive_definite": config.positive_definite,
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
