"""The selective scan of Mamba (Gu and Dao, 2023, arXiv:2312.00752) in pure PyTorch, fast on CPU.

Per channel ``d`` and state ``n`` the scan runs the linear recurrence

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,        y_t = C_t . h_t + D u_t   (times SiLU(z_t) if z)

with ``dt_t = softplus(delta_t + delta_bias)``. Storing every state costs ``L x d_inner x d_state`` numbers
(6.5 GB for one scan of 100,000 tokens at d_inner 1024, d_state 16), so neither pass does:

- The sequence is cut into blocks; only one block's states exist at a time, and only the state entering
  each block is kept for the backward pass (``L / block`` states).
- Inside a block the tokens form ``K`` chunks of ``chunk`` tokens. A Python loop over the ``chunk``
  positions advances all ``K`` chunks at once (each step is one vectorised op over ``K x d_inner x
  d_state`` numbers), a loop over the ``K`` chunks carries the state across chunk borders, and one
  vectorised fix-up adds each chunk's entering state times the chunk's running product of decays. This
  two-level scan does O(L) work, multiplies only decays in (0, 1] (no division, no overflow), and takes
  ``chunk + K`` small Python steps per block instead of one per token.
- The backward pass, a :class:`torch.autograd.Function`, walks the blocks in reverse: it recomputes a
  block's states from its stored entering state, runs the adjoint recurrence
  ``lam_t = exp(dt_{t+1} A) lam_{t+1} + C_t g_t`` (a reverse linear scan, two-level as above) and turns
  ``lam`` into the gradients, as mamba-ssm's CUDA kernels do. Its memory is also one block.

Tensors are channel-last here, ``(batch, L, d_inner)``, so that blocks are contiguous slices; the public
interface (:func:`pathmil.models.ssm.selective_scan`) takes mamba-ssm's ``(batch, d_inner, L)`` layout and
passes transposed views, without copies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Numbers per working buffer (a block has 4): 4 MB each in float32, so a block stays in a 32 MB L3 cache.
# Blocks of 32-96 tokens and chunks of 4-16 ran within 10% of each other at d_inner 1024 x d_state 16 on a
# 2-core AMD EPYC; larger blocks were slower (benchmarks/bench_mamba.py --tune compares them).
BLOCK_ELEMENTS = 1 << 20
# Tokens per chunk inside a block.
CHUNK = 8
_LOG2E = math.log2(math.e)


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    block: int | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Selective scan on channel-last tensors: u, delta, z ``(b, L, d)``; B, C ``(b, L, n)``; A ``(d, n)``.

    Returns y ``(b, L, d)`` in u's dtype; the work is done in float32 (float64 for float64 inputs).
    ``block`` (tokens per block) defaults to what keeps a working buffer at :data:`BLOCK_ELEMENTS`
    numbers; it is rounded down to a multiple of ``chunk``.
    """
    batch, _, d_inner = u.shape
    if block is None:
        block = BLOCK_ELEMENTS // max(1, batch * d_inner * A.shape[1])
    block = max(chunk, block // chunk * chunk)
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, chunk)


class _SelectiveScan(torch.autograd.Function):
    """Forward and recomputing backward of the blocked two-level scan (see the module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, chunk):
        work = _Work(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, chunk)
        y = torch.empty(u.shape, dtype=work.dtype, device=u.device)
        entering = torch.empty((len(work.blocks), *work.state_shape), dtype=work.dtype, device=u.device)
        h = torch.zeros(work.state_shape, dtype=work.dtype, device=u.device)
        for i, (s0, s1) in enumerate(work.blocks):
            entering[i] = h
            blk = work.scan_block(s0, s1, h)
            y[:, s0:s1] = work.output(blk)
            h = blk.h[:, blk.n - 1].clone()
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, entering)
        ctx.settings = (delta_softplus, block, chunk)
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B, C, D, z, delta_bias, entering = ctx.saved_tensors
        work = _Work(u, delta, A, B, C, D, z, delta_bias, *ctx.settings)
        grads = _Grads(work)
        g_state = torch.zeros(work.state_shape, dtype=work.dtype, device=u.device)
        for i in reversed(range(len(work.blocks))):
            s0, s1 = work.blocks[i]
            blk = work.scan_block(s0, s1, entering[i])
            g_state = grads.add_block(blk, grad_y[:, s0:s1].to(work.dtype), g_state)
        return (*grads.result(), None, None, None)


class _Block:
    """One block's discretised inputs and its states, the latter in the working buffers.

    The state buffer has one row more than the others: row 0 is the entering state and rows 1.. the
    states, so ``h`` (states) and ``h_prev`` (the state before each token) are two views of it. Rows past
    the block's ``n`` real tokens are padding, with zero decay and zero input.
    """

    def __init__(self, start, n, u, dt, dt_pre, z, Bm, C, decay, h_full):
        self.start, self.n = start, n
        self.u, self.dt, self.dt_pre, self.z, self.B, self.C = u, dt, dt_pre, z, Bm, C
        self.decay = decay  # exp(dt A), (b, rows, d, n)
        self.h = h_full[:, 1:]
        self.h_prev = h_full[:, :-1]


class _Work:
    """The inputs of one scan call (channel-last), its blocks and its reusable working buffers."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, chunk):
        self.dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
        self.u, self.delta, self.A_in, self.B, self.C, self.D, self.z = u, delta, A, B, C, D, z
        self.delta_bias, self.delta_softplus = delta_bias, delta_softplus
        self.A = A.to(self.dtype)
        self.A2 = self.A * _LOG2E  # exp(x A) = exp2(x A log2 e): torch's exp2 is several times faster
        self.Dv = None if D is None else D.to(self.dtype)
        batch, length, d_inner = u.shape
        self.state_shape = (batch, d_inner, A.shape[1])
        self.chunk = chunk
        rows = min(block, _ceil_to(max(length, 1), chunk))
        self.blocks = [(s, min(s + rows, length)) for s in range(0, length, rows)]
        shape = (batch, rows, d_inner, A.shape[1])
        self.decay = torch.empty(shape, dtype=self.dtype, device=u.device)
        self.h_full = torch.empty((batch, rows + 1, *shape[2:]), dtype=self.dtype, device=u.device)
        self.prod = torch.empty(shape, dtype=self.dtype, device=u.device)  # chunk products, then lam

    def scan_block(self, s0: int, s1: int, h0: torch.Tensor) -> _Block:
        """Discretise tokens [s0, s1) and scan them from the entering state ``h0``."""
        n = s1 - s0
        u = self.u[:, s0:s1].to(self.dtype)
        dt_pre = self.delta[:, s0:s1].to(self.dtype)
        if self.delta_bias is not None:
            dt_pre = dt_pre + self.delta_bias.to(self.dtype)
        dt = F.softplus(dt_pre) if self.delta_softplus else dt_pre
        Bm = self.B[:, s0:s1].to(self.dtype)
        torch.mul(dt[..., None], self.A2, out=self.decay[:, :n]).exp2_()
        torch.mul((dt * u)[..., None], Bm[:, :, None, :], out=self.h_full[:, 1 : n + 1])
        self.decay[:, n:] = 0
        self.h_full[:, n + 1 :] = 0
        self.h_full[:, 0] = h0
        scan_forward(self.decay, self.h_full[:, 1:], h0, self.chunk, self.prod)
        z = None if self.z is None else self.z[:, s0:s1].to(self.dtype)
        C = self.C[:, s0:s1].to(self.dtype)
        return _Block(s0, n, u, dt, dt_pre, z, Bm, C, self.decay, self.h_full)

    def pre_gate(self, blk: _Block) -> torch.Tensor:
        """y before the SiLU(z) gate, ``C . h + D u``: (b, n, d)."""
        y = torch.einsum("bsdn,bsn->bsd", blk.h[:, : blk.n], blk.C)
        return y if self.Dv is None else y.addcmul_(blk.u, self.Dv)

    def output(self, blk: _Block) -> torch.Tensor:
        y = self.pre_gate(blk)
        return y if blk.z is None else y.mul_(F.silu(blk.z))


class _Grads:
    """The gradients of all inputs, filled block by block while the blocks are visited in reverse."""

    def __init__(self, work: _Work):
        self.work = work
        dtype, device = work.dtype, work.u.device
        self.u = torch.empty(work.u.shape, dtype=dtype, device=device)
        self.delta = torch.empty(work.delta.shape, dtype=dtype, device=device)
        self.B = torch.empty(work.B.shape, dtype=dtype, device=device)
        self.C = torch.empty(work.C.shape, dtype=dtype, device=device)
        self.z = None if work.z is None else torch.empty(work.z.shape, dtype=dtype, device=device)
        self.A = torch.zeros(work.A.shape, dtype=dtype, device=device)
        self.D = torch.zeros(work.u.shape[-1], dtype=dtype, device=device)
        self.delta_bias = torch.zeros(work.u.shape[-1], dtype=dtype, device=device)
        self.q = torch.empty_like(work.decay)

    def add_block(self, blk: _Block, g_out: torch.Tensor, g_state: torch.Tensor) -> torch.Tensor:
        """Add one block's gradients; ``g_state`` is dLoss/d(the block's last state) from later tokens.

        Returns dLoss/d(the state entering the block): the ``g_state`` of the block before.
        """
        w, n, span = self.work, blk.n, slice(blk.start, blk.start + blk.n)
        g_y = g_out
        if blk.z is not None:  # SiLU(z) = z sigmoid(z), SiLU'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
            sig = torch.sigmoid(blk.z)
            g_y = g_out * blk.z * sig
            self.z[:, span] = g_out * w.pre_gate(blk) * sig * (1 + blk.z * (1 - sig))
        if w.Dv is None:
            g_u = torch.zeros_like(g_y)
        else:
            g_u = g_y * w.Dv
            self.D += (g_y * blk.u).sum((0, 1))
        self.C[:, span] = torch.einsum("bsdn,bsd->bsn", blk.h[:, :n], g_y)

        lam = w.prod  # the forward scan's chunk products are spent; the buffer now holds the adjoint
        torch.mul(g_y[..., None], blk.C[:, :, None, :], out=lam[:, :n])
        lam[:, n:] = 0
        g_entering = scan_backward(blk.decay, lam, g_state, w.chunk, self.q)

        # h_t = decay_t h_{t-1} + dt_t B_t u_t, and lam_t is now the whole dLoss/dh_t
        lam = lam[:, :n]
        self.B[:, span] = torch.einsum("bsdn,bsd->bsn", lam, blk.dt * blk.u)
        g_dtu = torch.einsum("bsdn,bsn->bsd", lam, blk.B)
        g_u.addcmul_(g_dtu, blk.dt)
        g_dt = g_dtu.mul_(blk.u)
        # decay_t = exp(dt_t A): dLoss/d(dt_t A) = lam_t decay_t h_{t-1}, reduced against A (for dt) and
        # against dt (for A)
        lam.mul_(blk.decay[:, :n]).mul_(blk.h_prev[:, :n])
        g_dt += torch.einsum("bsdn,dn->bsd", lam, w.A)
        self.A += lam.mul_(blk.dt[..., None]).sum((0, 1))
        if w.delta_softplus:
            g_dt.mul_(torch.sigmoid(blk.dt_pre))
        self.delta_bias += g_dt.sum((0, 1))
        self.u[:, span] = g_u
        self.delta[:, span] = g_dt
        return g_entering

    def result(self) -> tuple:
        """Gradients in the order and dtypes of the inputs u, delta, A, B, C, D, z, delta_bias."""
        w = self.work
        pairs = [
            (self.u, w.u),
            (self.delta, w.delta),
            (self.A, w.A_in),
            (self.B, w.B),
            (self.C, w.C),
            (self.D, w.D),
            (self.z, w.z),
            (self.delta_bias, w.delta_bias),
        ]
        return tuple(None if ref is None else g.to(ref.dtype) for g, ref in pairs)


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def scan_forward(
    decay: torch.Tensor, h: torch.Tensor, h0: torch.Tensor, chunk: int, prod: torch.Tensor
) -> None:
    """In place along dim 1: ``h[:, t] <- decay[:, t] * h[:, t-1] + h[:, t]``, with ``h[:, -1] = h0``.

    ``decay`` and ``h`` are ``(b, rows, ...)`` with ``rows`` a multiple of ``chunk``; ``prod`` is a buffer
    of their shape that receives each chunk's running product of decays.
    """
    b, rows = h.shape[:2]
    k = rows // chunk
    a = decay.view(b, k, chunk, *decay.shape[2:])
    x = h.view(b, k, chunk, *h.shape[2:])
    p = prod.view(b, k, chunk, *prod.shape[2:])
    p[:, :, 0] = a[:, :, 0]
    for t in range(1, chunk):  # all chunks advance together, each from a zero state
        x[:, :, t].addcmul_(a[:, :, t], x[:, :, t - 1])
        torch.mul(a[:, :, t], p[:, :, t - 1], out=p[:, :, t])
    entering = torch.empty((b, k, *h.shape[2:]), dtype=h.dtype, device=h.device)
    carry = h0
    for j in range(k):  # the true state entering chunk j
        entering[:, j] = carry
        carry = torch.addcmul(x[:, j, -1], p[:, j, -1], carry)
    x.addcmul_(p, entering[:, :, None])


def scan_backward(
    decay: torch.Tensor, lam: torch.Tensor, g_next: torch.Tensor, chunk: int, prod: torch.Tensor
) -> torch.Tensor:
    """In place along dim 1, the adjoint recurrence ``lam[:, t] <- lam[:, t] + decay[:, t+1] * lam[:, t+1]``.

    ``g_next``, the adjoint flowing back into the last row from later tokens, enters the last row.
    Returns ``decay[:, 0] * lam[:, 0]``: the adjoint of the state before the first row.
    """
    b, rows = lam.shape[:2]
    k = rows // chunk
    a = decay.view(b, k, chunk, *decay.shape[2:])
    x = lam.view(b, k, chunk, *lam.shape[2:])
    q = prod.view(b, k, chunk, *prod.shape[2:])  # q[:, :, t] = product of a[:, :, t+1:] in the chunk
    q[:, :, -1] = 1
    for t in range(chunk - 2, -1, -1):
        x[:, :, t].addcmul_(a[:, :, t + 1], x[:, :, t + 1])
        torch.mul(a[:, :, t + 1], q[:, :, t + 1], out=q[:, :, t])
    entering = torch.empty((b, k, *lam.shape[2:]), dtype=lam.dtype, device=lam.device)
    carry = g_next
    for j in range(k - 1, -1, -1):  # the true adjoint entering chunk j at its last row
        entering[:, j] = carry
        carry = a[:, j, 0] * torch.addcmul(x[:, j, 0], q[:, j, 0], carry)
    x.addcmul_(q, entering[:, :, None])
    return carry
