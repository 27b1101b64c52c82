"""One Mamba branch in pure PyTorch, span by span: causal conv, SiLU, x_proj, dt_proj, scan, gate.

Composed with autograd, a branch stores its intermediates for the whole sequence: the conv output and its
SiLU, dt (each ``L x d_inner``) and, for SR-Mamba's reordered branch, reordered copies of x and z: about
six ``L x d_inner`` tensors per branch, 2.5 GB at 10^5 tokens and d_inner 1024, four branches in MambaMIL.
This :class:`torch.autograd.Function` runs the branch over the scan's spans of a few blocks instead (Gu
and Dao, 2023, fuse the same steps on GPU in mamba-ssm's ``mamba_inner_fn``). The forward pass keeps only
the state entering each block; the backward pass recomputes one span's conv and projections and its
blocks' states from x, z and those states, and pushes the gradients through them. It saves x and z,
which are views of in_proj's output that the layer holds anyway, and the parameters: nothing of size L
is added but the entering states (one ``d_inner x d_state`` state per 64 tokens).

``order`` runs the branch over the sequence ``x[:, order]`` (SR-Mamba's stride order, the reversed order
of bidirectional Mamba) and returns its output in the original positions; each span gathers its own
tokens, so the reordered sequence is never copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pathmil.models.ssm.torch_scan import CHUNK, Scanner, compute_dtype, spans_and_blocks


def mamba_branch_torch(
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
    block: int | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """``SiLU(z) * scan(SiLU(conv(x)))`` on channel-last ``x, z (b, L, d_inner)``, as mamba-ssm's branch.

    conv_weight ``(d_inner, d_conv)``; x_proj_weight ``(dt_rank + 2 d_state, d_inner)``; dt_proj_weight
    ``(d_inner, dt_rank)``; A ``(d_inner, d_state)`` (negative); D, biases ``(d_inner,)``.
    """
    weights = (conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
    return _Branch.apply(x, z, *weights, order, block, chunk)


class _Positions:
    """Which tokens of x a span reads: its own plus the conv's look-back, in sequence order."""

    def __init__(self, order: torch.Tensor | None, s0: int, s1: int, look_back: int):
        self.order, self.s0, self.s1 = order, s0, s1
        self.lo = max(0, s0 - look_back)  # first token the conv reads
        self.front_zeros = look_back - (s0 - self.lo)  # before the sequence start the conv reads zeros

    def take(self, t: torch.Tensor, start: int) -> torch.Tensor:
        """Tokens [start, s1) of the (ordered) sequence."""
        if self.order is None:
            return t[:, start : self.s1]
        return t[:, self.order[start : self.s1]]  # index_select would copy all of a strided t first

    def put(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """Write the span's tokens into their original positions."""
        if self.order is None:
            target[:, self.s0 : self.s1] = value
        else:
            target.index_copy_(1, self.order[self.s0 : self.s1], value.to(target.dtype))

    def add_look_back(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """Add a gradient over tokens [lo, s1) into their original positions."""
        if self.order is None:
            target[:, self.lo : self.s1] += value
        else:
            target.index_add_(1, self.order[self.lo : self.s1], value.to(target.dtype))


class _WeightGrads:
    """The gradients of the branch's conv and projection weights, summed over the spans."""

    def __init__(self, conv_w, conv_b, wx, wdt):
        self.conv = torch.zeros_like(conv_w)
        self.conv_bias = None if conv_b is None else torch.zeros_like(conv_b)
        self.x_proj = torch.zeros_like(wx)
        self.dt_proj = torch.zeros_like(wdt)


class _BranchSpan:
    """One span's conv, SiLU and projections (what its scan needs), and their backward pass."""

    def __init__(self, x, z, weights, d_state: int, pos: _Positions, dtype: torch.dtype):
        conv_w, conv_b, wx, wdt = weights
        self.pos, self.weights = pos, weights
        n, k = pos.s1 - pos.s0, conv_w.shape[1]
        # the rows the conv reads, with zeros before the sequence start: token t at row t + k - 1
        self.x_look = F.pad(pos.take(x, pos.lo).to(dtype), (0, 0, pos.front_zeros, 0))
        self.pre = torch.zeros((x.shape[0], n, x.shape[2]), dtype=dtype, device=x.device)
        if conv_b is not None:
            self.pre += conv_b
        for j in range(k):  # tap j reads the token k - 1 - j steps back
            self.pre.addcmul_(self.x_look[:, j : j + n], conv_w[:, j])
        self.u = F.silu(self.pre)
        self.dt_low, self.B, self.C = (self.u @ wx.T).split([wdt.shape[1], d_state, d_state], dim=-1)
        self.delta = self.dt_low @ wdt.T  # dt_proj's bias is added in the scan, as mamba-ssm does
        self.z = pos.take(z, pos.s0).to(dtype)

    def backward(self, g_u, g_delta, g_B, g_C, grads: _WeightGrads) -> torch.Tensor:
        """Add the span's weight gradients to ``grads``; return dLoss/d(the x rows the conv read)."""
        conv_w, _, wx, wdt = self.weights
        n = self.pre.shape[1]
        grads.dt_proj += torch.tensordot(g_delta, self.dt_low, dims=([0, 1], [0, 1]))
        g_xdbl = torch.cat([g_delta @ wdt, g_B, g_C], dim=-1)
        grads.x_proj += torch.tensordot(g_xdbl, self.u, dims=([0, 1], [0, 1]))
        g_pre = g_u + g_xdbl @ wx
        sig = torch.sigmoid(self.pre)  # SiLU'(p) = sigmoid(p) (1 + p (1 - sigmoid(p)))
        g_pre.mul_(sig * (1 + self.pre * (1 - sig)))
        if grads.conv_bias is not None:
            grads.conv_bias += g_pre.sum((0, 1))
        g_look = torch.zeros_like(self.x_look)
        for j in range(conv_w.shape[1]):
            g_look[:, j : j + n].addcmul_(g_pre, conv_w[:, j])
            grads.conv[:, j] += (g_pre * self.x_look[:, j : j + n]).sum((0, 1))
        return g_look[:, self.pos.front_zeros :]


class _Branch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, conv_w, conv_b, wx, wdt, dt_bias, A, D, order, block, chunk):
        batch, length, d_inner = x.shape
        dtype, d_state, look_back = compute_dtype(x), A.shape[1], conv_w.shape[1] - 1
        rows, spans = spans_and_blocks(batch, length, d_inner, d_state, block, chunk)
        scanner = Scanner(A, D, dt_bias, True, batch, rows, chunk, dtype)
        weights = _cast((conv_w, conv_b, wx, wdt), dtype)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        h = scanner.zero_state()
        entering = []
        for s0, s1 in spans:
            pos = _Positions(order, s0, s1, look_back)
            part = _BranchSpan(x, z, weights, d_state, pos, dtype)
            y_span, h = scanner.forward_span(part.u, part.delta, part.B, part.C, part.z, h)
            pos.put(y, y_span)
            entering.append(scanner.entering)
        ctx.save_for_backward(x, z, conv_w, conv_b, wx, wdt, dt_bias, A, D, order, *entering)
        ctx.settings = (rows, chunk, spans)
        return y

    @staticmethod
    def backward(ctx, g_y):
        x, z, conv_w, conv_b, wx, wdt, dt_bias, A, D, order, *entering = ctx.saved_tensors
        rows, chunk, spans = ctx.settings
        dtype, d_state, look_back = compute_dtype(x), A.shape[1], conv_w.shape[1] - 1
        scanner = Scanner(A, D, dt_bias, True, x.shape[0], rows, chunk, dtype)
        weights = _cast((conv_w, conv_b, wx, wdt), dtype)
        grads = _WeightGrads(*weights)
        g_x = torch.zeros(x.shape, dtype=dtype, device=x.device)
        g_z = torch.empty(z.shape, dtype=dtype, device=z.device)
        g_state = scanner.zero_state()
        for (s0, s1), states in zip(reversed(spans), reversed(entering)):
            pos = _Positions(order, s0, s1, look_back)
            part = _BranchSpan(x, z, weights, d_state, pos, dtype)
            g, g_state = scanner.backward_span(
                part.u, part.delta, part.B, part.C, part.z, states, pos.take(g_y, s0), g_state
            )
            pos.put(g_z, g.z)
            pos.add_look_back(g_x, part.backward(g.u, g.delta, g.B, g.C, grads))
        pairs = [
            (g_x, x),
            (g_z, z),
            (grads.conv, conv_w),
            (grads.conv_bias, conv_b),
            (grads.x_proj, wx),
            (grads.dt_proj, wdt),
            (scanner.g_delta_bias, dt_bias),
            (scanner.g_A, A),
            (scanner.g_D, D),
        ]
        return (*(None if ref is None else g.to(ref.dtype) for g, ref in pairs), None, None, None)


def _cast(tensors, dtype):
    return tuple(None if t is None else t.to(dtype) for t in tensors)
