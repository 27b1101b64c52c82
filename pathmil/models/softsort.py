"""SoftSort: a differentiable relaxation of sorting (Prillo and Eisenschlos, "SoftSort: A Continuous
Relaxation for the argsort Operator", ICML 2020), as Vo et al. (ICLR 2025) use it to reorder Mamba's tokens.

For scores s (N,), the relaxed permutation matrix that sorts them in ascending order is

    P[i, j] = softmax_j( -|sort(s)_i - s_j| / tau ),

so row i mixes the tokens whose scores lie near the i-th smallest score; as tau -> 0 it becomes the hard
permutation. ``P @ x`` sorts tokens, ``P^T @ y`` puts sorted outputs back in place. Gradients reach the
scores through the mixing weights (the sorted values are themselves a differentiable gather of s).

The full P has N^2 entries, too many for a slide of 10^5 tiles. Because the scores are sorted, the tokens
nearest in score to slot i are those of neighbouring rank, so :class:`SoftPermutation` keeps, for each
slot, only the tokens within ``window`` ranks on either side: the exact SoftSort whenever N <= window + 1,
and otherwise a banded approximation that drops the smallest weights (each at most exp(-gap / tau) of the
largest, where gap is the score difference across the window). Memory and time are O(N window d).
"""

from __future__ import annotations

import torch


class SoftPermutation:
    """The relaxed ascending sort of ``scores (B, N)`` with temperature ``tau``, banded to ``window`` ranks.

    :meth:`sort` maps tokens ``(B, N, d)`` to their softly sorted sequence (``P @ x``); :meth:`unsort`
    maps a sequence in sorted order back to the original positions (``P^T @ y``). Raises ``ValueError``
    for a non-positive ``tau`` or ``window``.
    """

    def __init__(self, scores: torch.Tensor, tau: float = 1.0, window: int = 64):
        if tau <= 0 or window < 1:
            raise ValueError(f"SoftSort needs tau > 0 and window >= 1, got tau={tau}, window={window}")
        _b, n = scores.shape
        self.n = n
        self.order = torch.argsort(scores.detach(), dim=1, stable=True)  # hard ranks (piecewise constant)
        ranked = scores.gather(1, self.order)  # sort(s): differentiable values in ascending order
        self.full = n <= window + 1
        if self.full:
            # P[i, j] over every token: the exact SoftSort matrix (B, N, N), columns in the original order
            self.weights = torch.softmax(-(ranked[:, :, None] - scores[:, None, :]).abs() / tau, dim=-1)
            return
        # banded: slot i mixes the tokens of rank i - window ... i + window (those inside the sequence)
        self.window = window
        offsets = torch.arange(-window, window + 1, device=scores.device)
        rank = torch.arange(n, device=scores.device)[:, None] + offsets  # (N, 2w + 1)
        valid = (rank >= 0) & (rank < n)
        neighbour = ranked[:, rank.clamp(0, n - 1)]  # (B, N, 2w + 1)
        logits = -(ranked[:, :, None] - neighbour).abs() / tau
        self.weights = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """``P @ x``: tokens ``(B, N, d)`` in their original order -> the softly sorted sequence."""
        if self.full:
            return self.weights.to(x.dtype) @ x
        ranked = x.gather(1, self.order[..., None].expand_as(x))
        return self._band(ranked, transpose=False)

    def unsort(self, y: torch.Tensor) -> torch.Tensor:
        """``P^T @ y``: a sequence ``(B, N, d)`` in sorted order -> outputs at the original positions."""
        if self.full:
            return self.weights.to(y.dtype).mT @ y
        ranked = self._band(y, transpose=True)
        return torch.empty_like(ranked).scatter_(1, self.order[..., None].expand_as(ranked), ranked)

    def _band(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        """The banded product in rank space: out_i = sum_k W[i, k] x_{i-w+k}, or its transpose."""
        w, n = self.window, self.n
        weights = self.weights.to(x.dtype)
        padded = torch.nn.functional.pad(x, (0, 0, w, w))  # rank r sits at r + w
        out = torch.zeros_like(x)
        for k in range(2 * w + 1):
            if not transpose:  # slot i reads rank i - w + k
                out = out + weights[:, :, k, None] * padded[:, k : k + n]
            else:  # rank r receives from slot r + w - k, which read it with weight W[r + w - k, k]
                source = torch.nn.functional.pad(weights[:, :, k], (w, w))[:, 2 * w - k : 2 * w - k + n]
                out = out + source[..., None] * padded[:, 2 * w - k : 2 * w - k + n]
        return out
