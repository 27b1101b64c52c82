"""TransMIL (Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide
Image Classification", NeurIPS 2021) with Nystrom attention (Xiong et al., "Nystromformer: A Nystrom-based
Algorithm for Approximating Self-Attention", AAAI 2021).

Instances are embedded (Linear + ReLU), the sequence is padded to a square by repeating its first tokens, a
class token is put in front, and two TransLayers (pre-norm Nystrom self-attention with a residual) run with
a PPEG between them (depthwise 7/5/3 convolutions on the square grid plus identity, a conditional position
encoding); the class token after a LayerNorm is the bag embedding and a linear head reads it.

The instance scores are the class token's attention to the real instances in the second TransLayer,
averaged over heads. Nystrom attention never forms the N x N matrix, but its first row is cheap and exact
for the approximation the layer really applies: row_0 = softmax(q_0 K~^T) pinv(softmax(Q~ K~^T))
softmax(Q~ K^T) (landmarks Q~, K~), a 1 x m by m x m by m x N product. That row can hold small negative
values (the pseudo-inverse is approximate), which are clipped to 0; the weights of the repeated padding
tokens are dropped and the rest renormalised to sum to 1, as ABMIL's attention does. The depthwise
convolution on the values (Nystromformer's residual, kernel 33) also mixes neighbouring tokens into the
class token's output; it is not attention and is left out of the scores.

Nystrom attention is our own (the ``nystrom-attention`` package on PyPI pads the sequence with zero tokens
that take part in the softmax and builds the full N x N matrix to return attention): landmarks are the
means of m contiguous segments of nearly equal length (no padding), bags of at most m tokens get exact
softmax attention, and the pseudo-inverse uses the paper's iteration. Bags in a padded batch are run one by
one on their real instances, so padding never changes a bag's output.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from pathmil.models.base import MILModel, MILOutput
from pathmil.models.registry import register_model
from pathmil.settings import Settings


class TransMILConfig(Settings):
    """TransMIL's settings (the ``model`` section of ``--aggregator transmil``; Shao et al., NeurIPS 2021)."""

    section = "model"
    hidden: int = Field(512, ge=1, description="token width after the input projection")
    heads: int = Field(8, ge=1, description="attention heads of each TransLayer")
    landmarks: int = Field(256, ge=1, description="Nystrom landmarks of each TransLayer")
    pinv_iterations: int = Field(6, ge=1, description="iterations of the Moore-Penrose pseudo-inverse")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout of the attention output")


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of the square matrices ``a`` (..., m, m) by the iteration of Razavi et
    al. (2014) that Nystromformer uses: cheaper than an SVD on a GPU and smooth to differentiate.

    Z_0 = A^T / (max row sum * max column sum of |A|); Z <- Z (13 I - AZ (15 I - AZ (7 I - AZ))) / 4.
    The scale is per matrix (the paper takes one over the whole batch), which only speeds convergence.
    """
    magnitude = a.abs()
    scale = magnitude.sum(-1).amax(-1) * magnitude.sum(-2).amax(-1)
    z = a.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segment_means(x: torch.Tensor, segments: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Means of the rows of ``x`` (..., n, d) per segment id (n,): the Nystrom landmarks (..., m, d)."""
    sums = x.new_zeros(*x.shape[:-2], n_segments, x.shape[-1]).index_add(-2, segments, x)
    counts = torch.bincount(segments, minlength=n_segments).to(x.dtype)
    return sums / counts[:, None]


class NystromAttention(nn.Module):
    """Multi-head self-attention approximated with ``landmarks`` Nystrom landmarks (exact for short input)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads, self.landmarks, self.pinv_iterations = heads, landmarks, pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        # Nystromformer's skip connection: a depthwise convolution of the values along the sequence
        self.residual = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, n, dim) -> (output (B, n, dim), first token's attention (B, heads, n))."""
        b, n, dim = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        # softmaxes and the pseudo-inverse iteration need float32 (or float64) under mixed precision
        wide = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.to(wide) * (dim // self.heads) ** -0.5, k.to(wide), v.to(wide)
            if n <= self.landmarks:
                attention = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
                out, first = attention @ v, attention[..., 0, :]
            else:
                segments = torch.arange(n, device=x.device) * self.landmarks // n
                q_land = segment_means(q, segments, self.landmarks)
                k_land = segment_means(k, segments, self.landmarks)
                kernel1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)  # n x m
                kernel2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)  # m x m
                kernel3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)  # m x n
                inverse = iterative_pinv(kernel2, self.pinv_iterations)
                out = kernel1 @ (inverse @ (kernel3 @ v))
                first = (kernel1[..., :1, :] @ inverse @ kernel3).squeeze(-2)
            out = out + self.residual(v)
        out = out.transpose(1, 2).reshape(b, n, dim).to(x.dtype)
        return self.to_out(out), first


class TransLayer(nn.Module):
    """TransMIL's layer: x + NystromAttention(LayerNorm(x)); returns the first token's attention too."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, heads, landmarks, pinv_iterations, dropout=dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, first = self.attention(self.norm(x))
        return x + out, first


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions on the token grid, plus identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """``x`` (B, 1 + side^2, C): the class token passes through, the rest is read as a side x side grid."""
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILModel):
    """Linear + ReLU, class token, square padding, TransLayer, PPEG, TransLayer, LayerNorm, linear head.

    ``embed`` and ``aggregate`` are the two halves of ``forward``: MHIM-MIL embeds only the instances its
    teacher keeps and aggregates them with recycled tokens appended.
    """

    def __init__(self, in_dim: int, n_outputs: int, config: TransMILConfig | None = None):
        super().__init__(in_dim, n_outputs)
        c = config or TransMILConfig()
        self.encoder = nn.Sequential(nn.Linear(in_dim, c.hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, c.hidden))
        self.layer1 = TransLayer(c.hidden, c.heads, c.landmarks, c.pinv_iterations, c.dropout)
        self.ppeg = PPEG(c.hidden)
        self.layer2 = TransLayer(c.hidden, c.heads, c.landmarks, c.pinv_iterations, c.dropout)
        self.norm = nn.LayerNorm(c.hidden)
        self.classifier = nn.Linear(c.hidden, n_outputs)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Instance embeddings (B, N, hidden)."""
        return self.encoder(x)

    def aggregate(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """The bag outputs of embedded instances ``h`` (B, N, hidden); bags with a mask run one by one."""
        if mask is None:
            return self._aggregate(h)
        outputs = [self._aggregate(h[b, mask[b]][None]) for b in range(h.shape[0])]
        scores = h.new_zeros(mask.shape)
        tokens = h.new_zeros(h.shape)
        for b, out in enumerate(outputs):
            scores[b, mask[b]] = out.instance_scores[0]
            tokens[b, mask[b]] = out.instance_embeddings[0]
        return MILOutput(
            logits=torch.cat([o.logits for o in outputs]),
            embedding=torch.cat([o.embedding for o in outputs]),
            instance_scores=scores,
            instance_embeddings=tokens,
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        return self.aggregate(self.embed(x), mask)

    def _aggregate(self, h: torch.Tensor) -> MILOutput:
        b, n, _ = h.shape
        side = math.ceil(math.sqrt(n))
        repeat = torch.arange(side * side - n, device=h.device) % n  # the first tokens, again
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(h.dtype), h, h[:, repeat]], dim=1)
        tokens, _ = self.layer1(tokens)
        tokens = self.ppeg(tokens, side)
        tokens, first = self.layer2(tokens)
        tokens = self.norm(tokens)
        z = tokens[:, 0]
        scores = first.mean(dim=1)[:, 1 : n + 1].clamp(min=0)  # real instances only, heads averaged
        scores = scores / scores.sum(dim=1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
        return MILOutput(
            logits=self.classifier(z),
            embedding=z,
            instance_scores=scores.to(h.dtype),
            instance_embeddings=tokens[:, 1 : n + 1],
        )


@register_model("transmil", settings=TransMILConfig)
def transmil(in_dim: int, n_outputs: int, settings: TransMILConfig) -> TransMIL:
    return TransMIL(in_dim, n_outputs, settings)
