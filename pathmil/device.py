"""Where tensors run: one device resolver and one autocast helper for extraction, training and inference."""

from __future__ import annotations

import contextlib

import torch

from pathmil.errors import PathmilError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error.

    Raises:
        PathmilError: ``cuda`` asked for where torch sees no GPU, or an unknown name.
    """
    if name not in DEVICES:
        raise PathmilError(f"device must be one of {', '.join(DEVICES)}, got '{name}'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PathmilError("device 'cuda' asked for, but torch sees no CUDA GPU; use device auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision at ``dtype`` on ``device``; ``None`` runs at full precision (float32).

    One helper for every stage, so training, prediction and heatmaps score a bag the same way.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def mil_autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """MIL models run in bf16 autocast on a GPU when ``amp`` is on, in float32 on a CPU."""
    return torch.bfloat16 if amp and device.type == "cuda" else None


def scoring_dtype(device: torch.device) -> torch.dtype:
    """The precision written scores are computed in: float64 on the CPU, float32 on a GPU.

    A float32 result depends on the order of its sums, which CPU kernels choose by instruction set (AVX2,
    AVX-512, AMX) and thread count: a fold's ``predictions.csv`` written by a one-thread training job and
    ``pathmil predict`` on all cores of an AVX-512 BF16 CPU differed by up to 1.9e-4 (sTIL %: a logit
    difference of ~1e-6 times the target's standard deviation). In float64 such differences are ~1e-13,
    so training's predictions, ``pathmil predict`` and heatmaps agree to 1e-6 on every CPU and thread
    count. On a GPU, scores keep training's precision (bf16 autocast with ``amp``).
    """
    return torch.float64 if device.type == "cpu" else torch.float32
