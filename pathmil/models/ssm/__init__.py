"""Selective state-space scans for Mamba: one interface, two backends.

``selective_scan`` and ``causal_conv1d`` take mamba-ssm's layouts and arguments. Backend ``"auto"`` runs
the mamba-ssm / causal-conv1d CUDA kernels when the tensors are on a GPU and the kernels import, and the
pure-PyTorch code (:mod:`.torch_scan`, :mod:`.conv`, fast on CPU) otherwise; ``"torch"`` always runs the
latter; ``"cuda"`` insists on the kernels and says how to install them when they are missing. Both
backends compute the same function (tests compare them with a float64 sequential reference).
"""

from __future__ import annotations

import torch

from pathmil.errors import PathmilError
from pathmil.models.ssm import cuda
from pathmil.models.ssm.conv import causal_conv1d_torch
from pathmil.models.ssm.torch_scan import selective_scan_torch

BACKENDS = ("auto", "torch", "cuda")

__all__ = ["BACKENDS", "causal_conv1d", "resolve_backend", "selective_scan"]


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
