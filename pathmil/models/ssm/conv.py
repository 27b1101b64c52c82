"""Mamba's short causal depthwise convolution, with an optional SiLU, in pure PyTorch.

``out[t] = act(bias + sum_j w[j] * x[t - (k - 1) + j])`` per channel, with zeros before the sequence start
(Gu and Dao, 2023). The tensors are channel-last ``(b, L, d)`` so each tap is one vectorised multiply-add
over a shifted slice. A :class:`torch.autograd.Function` keeps only ``x`` for the backward pass and
recomputes the pre-activation there: composing the taps with autograd would store a padded copy of ``x``
and the pre-activation as well, two extra ``L x d`` tensors per Mamba branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = True
) -> torch.Tensor:
    """Causal depthwise convolution of channel-last ``x (b, L, d)`` with ``weight (d, k)``, ``bias (d,)``."""
    return _CausalConv.apply(x, weight, bias, silu)


def _pre_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    length, k = x.shape[1], weight.shape[1]
    out = torch.zeros(x.shape, dtype=torch.result_type(x, weight), device=x.device)
    if bias is not None:
        out += bias
    for j in range(k):
        shift = k - 1 - j  # tap j sees the token `shift` steps back
        if shift < length:
            out[:, shift:].addcmul_(x[:, : length - shift], weight[:, j])
    return out


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        pre = _pre_activation(x, weight, bias)
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        if ctx.silu:  # SiLU'(p) = sigmoid(p) (1 + p (1 - sigmoid(p))), in place: two L x d buffers at most
            pre = _pre_activation(x, weight, bias)
            sig = torch.sigmoid(pre)
            pre.mul_(1 - sig).add_(1).mul_(sig).mul_(grad)
            grad, sig = pre, None
        length, k = x.shape[1], weight.shape[1]
        g_x = torch.zeros(x.shape, dtype=grad.dtype, device=grad.device)
        g_w = torch.zeros_like(weight)
        for j in range(k):
            shift = k - 1 - j
            if shift < length:
                g_x[:, : length - shift].addcmul_(grad[:, shift:], weight[:, j])
                g_w[:, j] = (grad[:, shift:] * x[:, : length - shift]).sum((0, 1))
        g_b = None if bias is None else grad.sum((0, 1))
        return g_x, g_w, g_b, None
