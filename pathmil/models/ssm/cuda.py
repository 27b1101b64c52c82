"""The mamba-ssm and causal-conv1d CUDA kernels, imported lazily: optional GPU-only extras.

``pip install 'pathmil[mamba]'`` builds them (it needs nvcc and a CUDA build of torch). Nothing here is
imported until a GPU run asks for the kernels, so pathmil installs and runs without them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from pathmil.errors import PathmilError

INSTALL_HINT = "pip install 'pathmil[mamba]' (needs nvcc and a CUDA build of torch)"


@functools.cache
def _scan_kernel() -> Callable | None:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


@functools.cache
def _conv_kernel() -> Callable | None:
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn


def scan_available() -> bool:
    """Whether mamba-ssm's selective-scan kernel imports."""
    return _scan_kernel() is not None


def conv_available() -> bool:
    """Whether causal-conv1d's kernel imports."""
    return _conv_kernel() is not None


def require_scan() -> None:
    if not scan_available():
        raise PathmilError(
            f"Mamba backend 'cuda' needs the mamba-ssm kernels: {INSTALL_HINT}, or use 'torch'"
        )


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True) -> torch.Tensor:
    """mamba-ssm's ``selective_scan_fn`` on ``(b, d, L)`` tensors (B, C ``(b, n, L)``).

    The kernel takes one type for ``u, delta, B, C, z`` (float32, float16 or bfloat16) and float32 for
    ``A, D, delta_bias``, and refuses anything else. Under autocast the projections come out in 16 bits
    while float32 parameters promote other pieces, so ``delta, B, C, z`` are cast here to ``u``'s type (A,
    D and delta_bias are parameters, float32 under autocast too).
    """
    require_scan()
    kernel = _scan_kernel()
    dtype = u.dtype
    delta, B, C = delta.to(dtype), B.to(dtype), C.to(dtype)
    z = None if z is None else z.to(dtype)
    return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """causal-conv1d's ``causal_conv1d_fn`` on ``x (b, d, L)`` (channel-last strides allowed), ``weight (d, k)``."""
    kernel = _conv_kernel()
    if kernel is None:
        raise PathmilError(f"the causal-conv1d kernel is not installed: {INSTALL_HINT}")
    return kernel(x, weight, bias, activation="silu" if silu else None)
