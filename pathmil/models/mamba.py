"""Mamba blocks with mamba-ssm's parameter names: plain Mamba, SR-Mamba (MambaMIL) and bidirectional.

- :class:`Mamba` is the block of Gu and Dao (2023, arXiv:2312.00752) with the names and shapes of
  mamba-ssm's ``Mamba`` (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``),
  so a mamba-ssm (or mambapy) state dict loads into it. in_proj splits each token into ``x`` and the gate
  ``z``; a branch runs ``x`` through the causal depthwise conv and SiLU, x_proj gives the input-dependent
  ``dt`` (through dt_proj), ``B`` and ``C``, and the selective scan returns ``y * SiLU(z)``; out_proj maps
  back to ``d_model``.
- :class:`SRMamba` (Yang et al., MambaMIL, MICCAI 2024) adds a second branch with its own conv, x_proj,
  dt_proj, A and D over the same in_proj output, run on the sequence reordered with stride ``rate``
  (:func:`stride_order`) and put back in order before ``out_proj(y1 + y2)``. The parameter names are
  those of the MambaMIL authors' code (``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b``).
- :class:`BiMamba`: the same with the second branch on the reversed sequence (as the authors' BiMamba).
- ``positive_definite`` (Vo et al., "Demystifying the Token Dynamics of Deep Selective State Space
  Models", ICLR 2025): tokens of a deep selective SSM all converge to zero when the input/output
  projection S_C^T S_B has negative eigenvalues, which harms learning. With the option, each branch's
  input projection is tied to its output projection, S_B = diag(softplus(s)) S_C with a learned s
  (``pd_scale``, ``pd_scale_b``; d_state values), so S_C^T S_B = S_C^T diag(.) S_C is positive
  semi-definite throughout training. x_proj keeps mamba-ssm's shape; its S_B rows are then unused.

The authors pad the sequence to a multiple of the rate with zero tokens that then flow through the second
branch's conv and scan, so real tokens after them in the reordered sequence see them. Here the padded
positions are dropped from the order instead (the same order of the real tokens, without the zeros):
identical whenever the rate divides the length, and otherwise no output depends on artificial tokens.

Memory: on CPU a branch is one blockwise autograd Function (:func:`pathmil.models.ssm.mamba_branch`) that
keeps nothing of the sequence's length beyond in_proj's output, so a block stores about four
``L x d_inner`` tensors whatever the number of branches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pathmil.models.ssm import mamba_branch


def stride_order(length: int, rate: int, device: torch.device | None = None) -> torch.Tensor:
    """SR-Mamba's token order: positions 0, R, 2R, ..., then 1, R+1, ..., then 2, ... (rate R).

    As MambaMIL: pad the length to K * R (K = ceil(L / R)), view as (K, R), transpose, flatten; the
    padded positions (>= L) are left out.
    """
    k = -(-length // rate)
    order = torch.arange(k * rate, device=device).view(k, rate).t().flatten()
    return order[order < length]


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The permutation that puts ``x[:, order]`` back in place: ``x[:, order][:, inverse] == x``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse


class Mamba(nn.Module):
    """Mamba block with mamba-ssm's parameter names; ``(b, L, d_model) -> (b, L, d_model)``.

    ``backend``: ``auto`` (mamba-ssm CUDA kernels on a GPU when installed, else PyTorch), ``torch`` or
    ``cuda``.
    """

    has_second_branch = False

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        backend: str = "auto",
        positive_definite: bool = False,
    ):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.backend = backend
        self.positive_definite = positive_definite
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self._new_branch()
        self.pd_scale = self._new_pd_scale()
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _new_pd_scale(self) -> nn.Parameter | None:
        """s of S_B = diag(softplus(s)) S_C (``positive_definite``), starting at softplus(s) = 1."""
        if not self.positive_definite:
            return None
        return nn.Parameter(torch.full((self.d_state,), math.log(math.e - 1)))

    def _x_proj_weight(self, x_proj: nn.Linear, pd_scale: nn.Parameter | None) -> torch.Tensor:
        """x_proj's weight (dt_rank + 2 d_state, d_inner), with S_B tied to S_C when positive definite."""
        if pd_scale is None:
            return x_proj.weight
        rank, n = self.dt_rank, self.d_state
        s_c = x_proj.weight[rank + n :]
        s_b = nn.functional.softplus(pd_scale).to(s_c.dtype)[:, None] * s_c
        return torch.cat([x_proj.weight[:rank], s_b, s_c])

    def _new_branch(self) -> tuple[nn.Conv1d, nn.Linear, nn.Linear, nn.Parameter, nn.Parameter]:
        """A branch's parameters, initialised as mamba-ssm does (dt log-uniform in [1e-3, 0.1], S4D-real A)."""
        d_inner, rank, n = self.d_inner, self.dt_rank, self.d_state
        conv = nn.Conv1d(d_inner, d_inner, self.d_conv, groups=d_inner, padding=self.d_conv - 1)
        x_proj = nn.Linear(d_inner, rank + 2 * n, bias=False)
        dt_proj = nn.Linear(rank, d_inner, bias=True)
        nn.init.uniform_(dt_proj.weight, -(rank**-0.5), rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(
            min=1e-4
        )
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
        A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        D = nn.Parameter(torch.ones(d_inner))
        A_log._no_weight_decay = True  # as mamba-ssm: optimisers that honour the flag skip decay
        D._no_weight_decay = True
        return conv, x_proj, dt_proj, A_log, D

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        y = self._first(x, z)
        if self.has_second_branch:
            y = y + self._second(x, z)
        return self.out_proj(y)

    def _first(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self._branch(
            x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, pd_scale=self.pd_scale
        )

    def _second(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _branch(self, x, z, conv1d, x_proj, dt_proj, A_log, D, order=None, pd_scale=None) -> torch.Tensor:
        """One branch on channel-last ``x, z (b, L, d_inner)`` (over ``x[:, order]`` if given)."""
        y = mamba_branch(
            x,
            z,
            conv1d.weight[:, 0],
            conv1d.bias,
            self._x_proj_weight(x_proj, pd_scale),
            dt_proj.weight,
            _at_least_fp32(dt_proj.bias),
            -torch.exp(_at_least_fp32(A_log)),
            _at_least_fp32(D),
            order=order,
            backend=self.backend,
        )
        return y.to(x.dtype)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """A, D and the dt bias stay in float32 under half-precision autocast, as mamba-ssm keeps them."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _TwoBranchMamba(Mamba):
    """A Mamba block with a second branch (own conv/x_proj/dt_proj/A/D) over a reordered sequence."""

    has_second_branch = True

    def __init__(self, d_model: int, **kwargs):
        super().__init__(d_model, **kwargs)
        self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = self._new_branch()
        self.pd_scale_b = self._new_pd_scale()

    def order(self, length: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _second(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        order = self.order(x.shape[1], x.device)
        weights = (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        return self._branch(x, z, *weights, order, pd_scale=self.pd_scale_b)


class SRMamba(_TwoBranchMamba):
    """SR-Mamba (Yang et al., MICCAI 2024): second branch on the sequence reordered with stride ``rate``."""

    def __init__(self, d_model: int, rate: int = 10, **kwargs):
        super().__init__(d_model, **kwargs)
        self.rate = rate

    def order(self, length: int, device: torch.device) -> torch.Tensor:
        return stride_order(length, self.rate, device)


class BiMamba(_TwoBranchMamba):
    """Bidirectional Mamba (as MambaMIL's BiMamba): second branch on the reversed sequence."""

    def order(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(length - 1, -1, -1, device=device)
