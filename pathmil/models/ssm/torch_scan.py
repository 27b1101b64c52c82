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
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, chunk)


def block_rows(batch: int, length: int, d_inner: int, d_state: int, block: int | None, chunk: int) -> int:
    """Tokens per block: ``block`` or what fits :data:`BLOCK_ELEMENTS`, a multiple of ``chunk``, <= L."""
    if block is None:
        block = BLOCK_ELEMENTS // max(1, batch * d_inner * d_state)
    block = max(chunk, block // chunk * chunk)
    return min(block, _ceil_to(max(length, 1), chunk))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _SelectiveScan(torch.autograd.Function):
    """Forward and recomputing backward of the blocked two-level scan (see the module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, chunk):
        batch, length, d_inner = u.shape
        rows = block_rows(batch, length, d_inner, A.shape[1], block, chunk)
        scanner = Scanner(A, D, delta_bias, delta_softplus, batch, rows, chunk, compute_dtype(u))
        y = torch.empty(u.shape, dtype=scanner.dtype, device=u.device)
        spans = [(s, min(s + rows, length)) for s in range(0, length, rows)]
        entering = scanner.new_states(len(spans))
        h = scanner.new_states(1)[0].zero_()
        for i, (s0, s1) in enumerate(spans):
            entering[i] = h
            blk = scanner.scan_block(
                u[:, s0:s1], delta[:, s0:s1], B[:, s0:s1], C[:, s0:s1], _part(z, s0, s1), h
            )
            y[:, s0:s1] = scanner.output(blk)
            h = blk.last_state()
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, entering)
        ctx.settings = (delta_softplus, rows, chunk, spans)
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B, C, D, z, delta_bias, entering = ctx.saved_tensors
        delta_softplus, rows, chunk, spans = ctx.settings
        scanner = Scanner(A, D, delta_bias, delta_softplus, u.shape[0], rows, chunk, compute_dtype(u))
        dtype = scanner.dtype
        g_u, g_delta, g_B, g_C = (
            torch.empty(t.shape, dtype=dtype, device=t.device) for t in (u, delta, B, C)
        )
        g_z = None if z is None else torch.empty(z.shape, dtype=dtype, device=z.device)
        g_state = torch.zeros_like(entering[0])
        for i in reversed(range(len(spans))):
            s0, s1 = spans[i]
            blk = scanner.scan_block(
                u[:, s0:s1], delta[:, s0:s1], B[:, s0:s1], C[:, s0:s1], _part(z, s0, s1), entering[i]
            )
            g, g_state = scanner.backward_block(blk, grad_y[:, s0:s1], g_state)
            g_u[:, s0:s1], g_delta[:, s0:s1], g_B[:, s0:s1], g_C[:, s0:s1] = g.u, g.delta, g.B, g.C
            if g_z is not None:
                g_z[:, s0:s1] = g.z
        pairs = [
            (g_u, u),
            (g_delta, delta),
            (scanner.g_A, A),
            (g_B, B),
            (g_C, C),
            (scanner.g_D, D),
            (g_z, z),
            (scanner.g_delta_bias, delta_bias),
        ]
        return (*(None if ref is None else g.to(ref.dtype) for g, ref in pairs), None, None, None)


def _part(t: torch.Tensor | None, s0: int, s1: int) -> torch.Tensor | None:
    return None if t is None else t[:, s0:s1]


class _Block:
    """One block's discretised inputs and its states, the latter in the scanner's working buffers.

    The state buffer has one row more than the others: row 0 is the entering state and rows 1.. the
    states, so ``h`` (states) and ``h_prev`` (the state before each token) are two views of it. Rows past
    the block's ``n`` real tokens are padding: decay 1 and input 0, so they pass the state on.
    """

    def __init__(self, n, u, dt, dt_pre, z, Bm, C, decay, h_full, totals):
        self.n, self.totals = n, totals
        self.u, self.dt, self.dt_pre, self.z, self.B, self.C = u, dt, dt_pre, z, Bm, C
        self.decay = decay  # exp(dt A), (b, rows, d, n)
        self.h = h_full[:, 1:]
        self.h_prev = h_full[:, :-1]

    def last_state(self) -> torch.Tensor:
        return self.h[:, self.n - 1].clone()


class BlockGrads:
    """dLoss/d(block inputs): u, delta, z ``(b, n, d)``; B, C ``(b, n, d_state)``."""

    def __init__(self, u, delta, B, C, z):
        self.u, self.delta, self.B, self.C, self.z = u, delta, B, C, z


class Scanner:
    """Scans blocks of at most ``rows`` tokens, forward and backward, in reusable working buffers.

    Holds what all blocks share (A, D, the dt bias, the buffers) and accumulates the gradients of A, D and
    the dt bias over the blocks of a backward pass (``g_A``, ``g_D``, ``g_delta_bias``).
    """

    def __init__(self, A, D, delta_bias, delta_softplus, batch, rows, chunk, dtype):
        self.dtype, self.chunk, self.rows = dtype, chunk, rows
        self.A = A.to(dtype)
        self.A2 = self.A * _LOG2E  # exp(x A) = exp2(x A log2 e): torch's exp2 is several times faster
        self.D = None if D is None else D.to(dtype)
        self.delta_bias = None if delta_bias is None else delta_bias.to(dtype)
        self.delta_softplus = delta_softplus
        d_inner, d_state = A.shape
        self.state_shape = (batch, d_inner, d_state)
        device = A.device
        shape = (batch, rows, d_inner, d_state)
        self.decay = torch.empty(shape, dtype=dtype, device=device)
        self.h_full = torch.empty((batch, rows + 1, d_inner, d_state), dtype=dtype, device=device)
        self.lam = torch.empty(shape, dtype=dtype, device=device)
        self.work = torch.empty((batch, rows // chunk, d_inner, d_state), dtype=dtype, device=device)
        self.g_A = torch.zeros_like(self.A)
        self.g_D = torch.zeros(d_inner, dtype=dtype, device=device)
        self.g_delta_bias = torch.zeros(d_inner, dtype=dtype, device=device)

    def new_states(self, count: int) -> torch.Tensor:
        return torch.empty((count, *self.state_shape), dtype=self.dtype, device=self.A.device)

    def scan_block(self, u, delta, Bm, C, z, h0) -> _Block:
        """Discretise one block's tokens and scan them from the entering state ``h0``."""
        n = u.shape[1]
        u, Bm, C = u.to(self.dtype), Bm.to(self.dtype), C.to(self.dtype)
        dt_pre = delta.to(self.dtype)
        if self.delta_bias is not None:
            dt_pre = dt_pre + self.delta_bias
        dt = F.softplus(dt_pre) if self.delta_softplus else dt_pre
        torch.mul(dt[..., None], self.A2, out=self.decay[:, :n]).exp2_()
        torch.mul((dt * u)[..., None], Bm[:, :, None, :], out=self.h_full[:, 1 : n + 1])
        self.decay[:, n:] = 1  # padding rows pass the state on unchanged
        self.h_full[:, n + 1 :] = 0
        self.h_full[:, 0] = h0
        # each chunk's product of decays, exp(A * sum of its dt): no pass over the (rows, d, n) buffers
        dt_sum = F.pad(dt, (0, 0, 0, self.rows - n)).view(dt.shape[0], -1, self.chunk, dt.shape[2]).sum(2)
        totals = torch.mul(dt_sum[..., None], self.A2).exp2_()
        scan_forward(self.decay, self.h_full[:, 1:], h0, totals, self.chunk, self.work)
        z = None if z is None else z.to(self.dtype)
        return _Block(n, u, dt, dt_pre, z, Bm, C, self.decay, self.h_full, totals)

    def pre_gate(self, blk: _Block) -> torch.Tensor:
        """y before the SiLU(z) gate, ``C . h + D u``: (b, n, d)."""
        y = torch.einsum("bsdn,bsn->bsd", blk.h[:, : blk.n], blk.C)
        return y if self.D is None else y.addcmul_(blk.u, self.D)

    def output(self, blk: _Block) -> torch.Tensor:
        y = self.pre_gate(blk)
        return y if blk.z is None else y.mul_(F.silu(blk.z))

    def backward_block(
        self, blk: _Block, g_out: torch.Tensor, g_state: torch.Tensor
    ) -> tuple[BlockGrads, torch.Tensor]:
        """The block's input gradients, given dLoss/dy and ``g_state`` = dLoss/d(the block's last state).

        Also returns dLoss/d(the state entering the block): the ``g_state`` of the block before.
        """
        n, g_out = blk.n, g_out.to(self.dtype)
        g_y, g_z = g_out, None
        if blk.z is not None:  # SiLU(z) = z sigmoid(z), SiLU'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
            sig = torch.sigmoid(blk.z)
            g_y = g_out * blk.z * sig
            g_z = g_out * self.pre_gate(blk) * sig * (1 + blk.z * (1 - sig))
        if self.D is None:
            g_u = torch.zeros_like(g_y)
        else:
            g_u = g_y * self.D
            self.g_D += (g_y * blk.u).sum((0, 1))
        g_C = torch.einsum("bsdn,bsd->bsn", blk.h[:, :n], g_y)

        lam = self.lam
        torch.mul(g_y[..., None], blk.C[:, :, None, :], out=lam[:, :n])
        lam[:, n:] = 0
        g_entering = scan_backward(blk.decay, lam, g_state, blk.totals, self.chunk, self.work)

        # h_t = decay_t h_{t-1} + dt_t B_t u_t, and lam_t is now the whole dLoss/dh_t
        lam = lam[:, :n]
        g_B = torch.einsum("bsdn,bsd->bsn", lam, blk.dt * blk.u)
        g_dtu = torch.einsum("bsdn,bsn->bsd", lam, blk.B)
        g_u.addcmul_(g_dtu, blk.dt)
        g_dt = g_dtu.mul_(blk.u)
        # decay_t = exp(dt_t A): dLoss/d(dt_t A) = lam_t decay_t h_{t-1}, reduced against A (for dt) and
        # against dt (for A)
        lam.mul_(blk.decay[:, :n]).mul_(blk.h_prev[:, :n])
        g_dt += torch.einsum("bsdn,dn->bsd", lam, self.A)
        self.g_A += lam.mul_(blk.dt[..., None]).sum((0, 1))
        if self.delta_softplus:
            g_dt.mul_(torch.sigmoid(blk.dt_pre))
        self.g_delta_bias += g_dt.sum((0, 1))
        return BlockGrads(g_u, g_dt, g_B, g_C, g_z), g_entering


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def scan_forward(
    decay: torch.Tensor,
    h: torch.Tensor,
    h0: torch.Tensor,
    totals: torch.Tensor,
    chunk: int,
    work: torch.Tensor,
) -> torch.Tensor:
    """In place along dim 1: ``h[:, t] <- decay[:, t] * h[:, t-1] + h[:, t]``, with ``h[:, -1] = h0``.

    ``decay`` and ``h`` are ``(b, rows, ...)`` with ``rows = K * chunk``; ``totals (b, K, ...)`` holds each
    chunk's product of decays. Three phases: a scan of every chunk from zero, kept only as a running
    value (``work``, ``(b, K, ...)``), gives the chunk ends; a loop over the K chunks turns them into the
    true state entering each chunk; a second scan of every chunk from its entering state writes ``h``.
    Returns the entering states ``(b, K, ...)``.
    """
    b, rows = h.shape[:2]
    k = rows // chunk
    a = decay.view(b, k, chunk, *decay.shape[2:])
    x = h.view(b, k, chunk, *h.shape[2:])
    ends = work
    ends.copy_(x[:, :, 0])
    for t in range(1, chunk):  # all chunks advance together, each from a zero state
        torch.addcmul(x[:, :, t], a[:, :, t], ends, out=ends)
    entering = torch.empty_like(ends)
    entering[:, 0] = h0
    for j in range(k - 1):
        torch.addcmul(ends[:, j], totals[:, j], entering[:, j], out=entering[:, j + 1])
    x[:, :, 0].addcmul_(a[:, :, 0], entering)
    for t in range(1, chunk):
        x[:, :, t].addcmul_(a[:, :, t], x[:, :, t - 1])
    return entering


def scan_backward(
    decay: torch.Tensor,
    lam: torch.Tensor,
    g_next: torch.Tensor,
    totals: torch.Tensor,
    chunk: int,
    work: torch.Tensor,
) -> torch.Tensor:
    """In place along dim 1, the adjoint recurrence ``lam[:, t] <- lam[:, t] + decay[:, t+1] * lam[:, t+1]``.

    ``g_next``, the adjoint flowing back into the last row from later tokens, enters the last row; the
    phases mirror :func:`scan_forward`. Returns ``decay[:, 0] * lam[:, 0]``: the adjoint of the state
    before the first row.
    """
    b, rows = lam.shape[:2]
    k = rows // chunk
    a = decay.view(b, k, chunk, *decay.shape[2:])
    x = lam.view(b, k, chunk, *lam.shape[2:])
    starts = work
    starts.copy_(x[:, :, -1])
    for t in range(chunk - 2, -1, -1):  # every chunk from a zero adjoint after it
        torch.addcmul(x[:, :, t], a[:, :, t + 1], starts, out=starts)
    entering = torch.empty_like(starts)  # the adjoint flowing into each chunk's last row
    entering[:, k - 1] = g_next
    for j in range(k - 1, 0, -1):
        torch.mul(a[:, j, 0], starts[:, j], out=entering[:, j - 1])
        entering[:, j - 1].addcmul_(totals[:, j], entering[:, j])
    x[:, :, -1] += entering
    for t in range(chunk - 2, -1, -1):
        x[:, :, t].addcmul_(a[:, :, t + 1], x[:, :, t + 1])
    return a[:, 0, 0] * x[:, 0, 0]
