"""Selective state-space scans for Mamba: one interface, two backends.

``selective_scan`` and ``causal_conv1d`` take mamba-ssm's layouts and arguments; ``mamba_branch`` is
what a Mamba block runs per branch (conv, SiLU, x_proj, dt_proj, scan, gate). Backend ``"auto"`` runs
the mamba-ssm / causal-conv1d CUDA kernels when the tensors are on a GPU and the kernels import, and the
pure-PyTorch code (:mod:`.torch_scan`, :mod:`.torch_branch`, :mod:`.conv`, fast and memory-frugal on CPU)
otherwise; ``"torch"`` always runs the latter; ``"cuda"`` insists on the kernels and says how to install
them when they are missing. Both backends compute the same function (tests compare them with a float64
sequential reference).
"""

from __future__ import annotations

import torch

from pathmil.errors import PathmilError
from pathmil.models.ssm import cuda
from pathmil.models.ssm.conv import causal_conv1d_torch
from pathmil.models.ssm.torch_branch import mamba_branch_torch
from pathmil.models.ssm.torch_scan import selective_scan_torch

BACKENDS = ("auto", "torch", "cuda")

__all__ = ["BACKENDS", "causal_conv1d", "mamba_branch", "resolve_backend", "selective_scan"]


def resolve_backend(backend: str, on_gpu: bool) -> str:
    """The backend that runs: ``"torch"`` or ``"cuda"``, for a request and where the tensors live."""
    if backend not in BACKENDS:
        raise PathmilError(f"unknown Mamba backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "cuda":
        if not on_gpu:
            raise PathmilError(
                "Mamba backend 'cuda' needs the model on a CUDA GPU; use 'auto' or 'torch' on CPU"
            )
        cuda.require_scan()
        return "cuda"
    return "cuda" if on_gpu and cuda.scan_available() else "torch"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Mamba's selective scan (Gu and Dao, 2023), as mamba-ssm's ``selective_scan_fn``.

    u, delta, z: ``(batch, d, L)``; A: ``(d, n)``; B, C: ``(batch, n, L)``; D, delta_bias: ``(d,)``.
    Returns y ``(batch, d, L)``::

        dt_t = softplus(delta_t + delta_bias)
        h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = (C_t . h_t + D u_t) * SiLU(z_t)

    Channel-last tensors passed as transposed views (``x.transpose(1, 2)`` of a ``(batch, L, d)``
    tensor) are used as they are, without copies.
    """
    if resolve_backend(backend, u.is_cuda) == "cuda":
        return cuda.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y = selective_scan_torch(
        u.transpose(1, 2),
        delta.transpose(1, 2),
        A,
        B.transpose(1, 2),
        C.transpose(1, 2),
        D,
        None if z is None else z.transpose(1, 2),
        delta_bias,
        delta_softplus,
    )
    return y.transpose(1, 2)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal depthwise convolution of ``x (batch, d, L)`` with ``weight (d, k)``, then SiLU if ``silu``.

    As causal-conv1d's ``causal_conv1d_fn``; on a GPU without that package the PyTorch code runs (as
    mamba-ssm itself falls back), even for backend ``"cuda"``.
    """
    if resolve_backend(backend, x.is_cuda) == "cuda" and cuda.conv_available():
        return cuda.causal_conv1d(x, weight, bias, silu)
    return causal_conv1d_torch(x.transpose(1, 2), weight, bias, silu).transpose(1, 2)


def mamba_branch(
    x: torch.Tensor,
    z: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    order: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One branch of a Mamba block on channel-last ``x, z (batch, L, d_inner)``; returns ``(batch, L, d_inner)``.

    ``u = SiLU(conv(x))``; ``dt, B, C = x_proj(u)``; ``y = selective_scan(u, dt_proj.weight dt, A, B, C, D,
    z, dt_proj.bias)``. With ``order`` the branch runs over ``x[:, order]`` and ``y`` comes back in the
    original positions. On CPU this is one blockwise autograd Function (:mod:`.torch_branch`) that stores
    nothing of the sequence's length; on a GPU with mamba-ssm, the kernels composed by autograd.
    """
    if resolve_backend(backend, x.is_cuda) == "torch":
        weights = (conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
        return mamba_branch_torch(x, z, *weights, order=order)
    if order is not None:
        x, z = x[:, order], z[:, order]
    # in x's type, as causal-conv1d's kernel returns it (the PyTorch conv promotes to float32 weights)
    u = causal_conv1d(x.mT, conv_weight, conv_bias, silu=True, backend="cuda").mT.to(x.dtype)
    rank, d_state = dt_proj_weight.shape[1], A.shape[1]
    dt, B, C = torch.nn.functional.linear(u, x_proj_weight).split([rank, d_state, d_state], dim=-1)
    delta = torch.nn.functional.linear(dt, dt_proj_weight)
    y = cuda.selective_scan(u.mT, delta.mT, A, B.mT, C.mT, D, z.mT, dt_proj_bias, True).mT
    if order is not None:
        y = y[:, torch.argsort(order)]
    return y
