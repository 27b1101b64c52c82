"""The selective scan of Mamba (Gu and Dao, 2023, arXiv:2312.00752) in pure PyTorch, fast on CPU.

Per channel ``d`` and state ``n`` the scan runs the linear recurrence

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,        y_t = C_t . h_t + D u_t   (times SiLU(z_t) if z)

with ``dt_t = softplus(delta_t + delta_bias)``. Storing every state costs ``L x d_inner x d_state`` numbers
(6.5 GB for one scan of 100,000 tokens at d_inner 1024, d_state 16), so neither pass does:

- The sequence is cut into blocks; only one block's states exist at a time, and only the state entering
  each block is kept for the backward pass (``L / block`` states). Work per token and channel (dt, the
  gate, their gradients) is done once per span of several blocks, as whole-tensor operations.
- Inside a block the tokens form ``K`` chunks of ``chunk`` tokens and the scan has three phases, each a
  Python loop whose steps are vectorised over all K chunks (``K x d_inner x d_state`` numbers at a time):
  every chunk is scanned from a zero state, keeping only its running value, which gives the chunk ends;
  a loop over the K chunks turns them into the true state entering each chunk (a chunk's product of
  decays is ``exp(A * sum of its dt)``); every chunk is scanned again from that state. This does O(L)
  work, multiplies only decays in (0, 1] (no division, no overflow) and takes about ``2 chunk + K``
  Python steps per block instead of one per token.
- The backward pass, a :class:`torch.autograd.Function`, walks the blocks in reverse: it recomputes a
  block's states from its stored entering state, runs the adjoint recurrence
  ``lam_t = exp(dt_{t+1} A) lam_{t+1} + C_t g_t`` (a reverse linear scan, in the same three phases) and
  turns ``lam`` into the gradients, as mamba-ssm's CUDA kernels do. Its memory is also one block.

Tensors are channel-last here, ``(batch, L, d_inner)``, so that blocks are contiguous slices; the public
interface (:func:`pathmil.models.ssm.selective_scan`) takes mamba-ssm's ``(batch, d_inner, L)`` layout and
passes transposed views, without copies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Numbers per working buffer (a block has 4): 4 MB each in float32, so a block stays in a 32 MB L3 cache.
# Blocks of 32-64 tokens and chunks of 4-8 ran within 5% of each other at d_inner 1024 x d_state 16 on a
# 2-core AMD EPYC; larger blocks were slower (benchmarks/bench_mamba.py --tune compares them).
BLOCK_ELEMENTS = 1 << 20
# Tokens per chunk inside a block.
CHUNK = 8
# Tokens per span: per-channel work is done span by span (1 MB per span x d_inner tensor at d_inner 1024;
# 64-512 tokens ran alike, 1,024 was 7% slower: each fresh multi-MB temporary costs page faults).
SPAN = 256
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


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def spans_and_blocks(
    batch: int, length: int, d_inner: int, d_state: int, block: int | None, chunk: int
) -> tuple[int, list[tuple[int, int]]]:
    """Tokens per block (a multiple of ``chunk``) and the spans [s0, s1): whole blocks, the last one short."""
    if block is None:
        block = BLOCK_ELEMENTS // max(1, batch * d_inner * d_state)
    rows = min(max(chunk, block // chunk * chunk), _ceil_to(max(length, 1), chunk))
    span = max(rows, SPAN // rows * rows)
    return rows, [(s, min(s + span, length)) for s in range(0, length, span)]


class _SelectiveScan(torch.autograd.Function):
    """Forward and recomputing backward of the blocked scan (see the module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, chunk):
        batch, length, d_inner = u.shape
        rows, spans = spans_and_blocks(batch, length, d_inner, A.shape[1], block, chunk)
        scanner = Scanner(A, D, delta_bias, delta_softplus, batch, rows, chunk, compute_dtype(u))
        y = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        h = scanner.zero_state()
        entering = []
        for s0, s1 in spans:
            part = slice(s0, s1)
            y[:, part], h = scanner.forward_span(
                u[:, part], delta[:, part], B[:, part], C[:, part], _at(z, part), h
            )
            entering.append(scanner.entering)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, *entering)
        ctx.settings = (delta_softplus, rows, chunk, spans)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B, C, D, z, delta_bias, *entering = ctx.saved_tensors
        delta_softplus, rows, chunk, spans = ctx.settings
        scanner = Scanner(A, D, delta_bias, delta_softplus, u.shape[0], rows, chunk, compute_dtype(u))
        g_u, g_delta, g_B, g_C = (torch.empty_like(t) for t in (u, delta, B, C))
        g_z = None if z is None else torch.empty_like(z)
        g_state = scanner.zero_state()
        for (s0, s1), states in zip(reversed(spans), reversed(entering)):
            part = slice(s0, s1)
            g, g_state = scanner.backward_span(
                u[:, part],
                delta[:, part],
                B[:, part],
                C[:, part],
                _at(z, part),
                states,
                grad_y[:, part],
                g_state,
            )
            g_u[:, part], g_delta[:, part], g_B[:, part], g_C[:, part] = g.u, g.delta, g.B, g.C
            if g_z is not None:
                g_z[:, part] = g.z
        g_A, g_D, g_bias = (
            _cast(g, ref)
            for g, ref in zip((scanner.g_A, scanner.g_D, scanner.g_delta_bias), (A, D, delta_bias))
        )
        return g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias, None, None, None


def _at(t: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if t is None else t[:, part]


def _cast(g: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor | None:
    return None if ref is None else g.to(ref.dtype)


class _Block:
    """One block's decays and states, in the scanner's working buffers.

    The state buffer has one row more than the others: row 0 is the entering state and rows 1.. the
    states, so ``h`` (states) and ``h_prev`` (the state before each token) are two views of it. Rows past
    the block's ``n`` real tokens are padding: decay 1 and input 0, so they pass the state on.
    """

    def __init__(self, n, decay, h_full, totals):
        self.n, self.decay, self.totals = n, decay, totals  # decay: exp(dt A), (b, rows, d, n)
        self.h = h_full[:, 1:]
        self.h_prev = h_full[:, :-1]

    def last_state(self) -> torch.Tensor:
        return self.h[:, self.n - 1].clone()


class SpanGrads:
    """dLoss/d(span inputs): u, delta, z ``(b, S, d)``; B, C ``(b, S, d_state)``."""

    def __init__(self, u, delta, B, C, z):
        self.u, self.delta, self.B, self.C, self.z = u, delta, B, C, z


class Scanner:
    """Scans spans of tokens block by block, forward and backward, in reusable working buffers.

    Holds what all blocks share (A, D, the dt bias, the buffers) and sums the gradients of A, D and the dt
    bias over the spans of a backward pass. After :meth:`forward_span`, ``entering`` holds the state
    entering each of the span's blocks, which :meth:`backward_span` needs back.
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
        self.entering = torch.empty(0)

    def zero_state(self) -> torch.Tensor:
        return torch.zeros(self.state_shape, dtype=self.dtype, device=self.A.device)

    def _blocks(self, length: int) -> list[slice]:
        return [slice(r, min(r + self.rows, length)) for r in range(0, length, self.rows)]

    def _discretise(self, u, delta):
        u = u.to(self.dtype)
        dt_pre = delta.to(self.dtype)
        if self.delta_bias is not None:
            dt_pre = dt_pre + self.delta_bias
        dt = F.softplus(dt_pre) if self.delta_softplus else dt_pre
        return u, dt_pre, dt, dt * u

    def forward_span(self, u, delta, Bm, C, z, h):
        """y of a span ``(b, S, d)`` (in u's dtype) and the state after it, from the state ``h`` before it."""
        u, _, dt, dtu = self._discretise(u, delta)
        Bm, C = Bm.to(self.dtype), C.to(self.dtype)
        y = torch.empty(u.shape, dtype=self.dtype, device=u.device)
        blocks = self._blocks(u.shape[1])
        self.entering = torch.empty((len(blocks), *self.state_shape), dtype=self.dtype, device=u.device)
        for i, rows in enumerate(blocks):
            self.entering[i] = h
            blk = self._scan_block(dt[:, rows], dtu[:, rows], Bm[:, rows], h)
            y[:, rows] = torch.einsum("bsdn,bsn->bsd", blk.h[:, : blk.n], C[:, rows])
            h = blk.last_state()
        if self.D is not None:
            y.addcmul_(u, self.D)
        if z is not None:
            y.mul_(F.silu(z.to(self.dtype)))
        return y.to(u.dtype), h

    def backward_span(self, u, delta, Bm, C, z, entering, g_out, g_state) -> tuple[SpanGrads, torch.Tensor]:
        """Gradients of a span's inputs; ``g_state`` is dLoss/d(the state after the span), from later tokens.

        Also returns dLoss/d(the state before the span): the ``g_state`` of the span before.
        """
        u, dt_pre, dt, dtu = self._discretise(u, delta)
        Bm, C, g_out = Bm.to(self.dtype), C.to(self.dtype), g_out.to(self.dtype)
        shape, device = u.shape, u.device
        g_y, y, sig = g_out, None, None
        if z is not None:  # SiLU(z) = z sigmoid(z), SiLU'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
            z = z.to(self.dtype)
            sig = torch.sigmoid(z)
            g_y = g_out * z * sig
            y = torch.empty(shape, dtype=self.dtype, device=device)  # y before the gate
        g_B = torch.empty(Bm.shape, dtype=self.dtype, device=device)
        g_C = torch.empty(C.shape, dtype=self.dtype, device=device)
        g_dtu = torch.empty(shape, dtype=self.dtype, device=device)
        g_dt = torch.empty(shape, dtype=self.dtype, device=device)
        for i, rows in reversed(list(enumerate(self._blocks(shape[1])))):
            blk = self._scan_block(dt[:, rows], dtu[:, rows], Bm[:, rows], entering[i])
            h, n = blk.h[:, : blk.n], blk.n
            if y is not None:
                y[:, rows] = torch.einsum("bsdn,bsn->bsd", h, C[:, rows])
            g_C[:, rows] = torch.einsum("bsdn,bsd->bsn", h, g_y[:, rows])
            lam = self.lam
            torch.mul(g_y[:, rows, :, None], C[:, rows, None, :], out=lam[:, :n])
            lam[:, n:] = 0
            g_state = scan_backward(blk.decay, lam, g_state, blk.totals, self.chunk, self.work)
            # h_t = decay_t h_{t-1} + dt_t B_t u_t, and lam_t is now the whole dLoss/dh_t
            lam = lam[:, :n]
            g_B[:, rows] = torch.einsum("bsdn,bsd->bsn", lam, dtu[:, rows])
            g_dtu[:, rows] = torch.einsum("bsdn,bsn->bsd", lam, Bm[:, rows])
            # decay_t = exp(dt_t A): dLoss/d(dt_t A) = lam_t decay_t h_{t-1}, reduced against A (for dt)
            # and against dt (for A)
            lam.mul_(blk.decay[:, :n]).mul_(blk.h_prev[:, :n])
            g_dt[:, rows] = torch.einsum("bsdn,dn->bsd", lam, self.A)
            self.g_A += lam.mul_(dt[:, rows, :, None]).sum((0, 1))
        g_u = g_dtu * dt
        g_dt.addcmul_(g_dtu, u)
        g_z = None
        if self.D is not None:
            g_u.addcmul_(g_y, self.D)
            self.g_D += (g_y * u).sum((0, 1))
        if z is not None:
            if self.D is not None:
                y.addcmul_(u, self.D)
            g_z = (1 - sig).mul_(z).add_(1).mul_(sig).mul_(y).mul_(g_out)  # in place: one temporary
        if self.delta_softplus:
            g_dt.mul_(torch.sigmoid(dt_pre))
        self.g_delta_bias += g_dt.sum((0, 1))
        return SpanGrads(g_u, g_dt, g_B, g_C, g_z), g_state

    def _scan_block(self, dt, dtu, Bm, h0) -> _Block:
        """Discretise one block's tokens and scan them from the entering state ``h0``."""
        n = dt.shape[1]
        torch.mul(dt[..., None], self.A2, out=self.decay[:, :n]).exp2_()
        torch.mul(dtu[..., None], Bm[:, :, None, :], out=self.h_full[:, 1 : n + 1])
        self.decay[:, n:] = 1  # padding rows pass the state on unchanged
        self.h_full[:, n + 1 :] = 0
        self.h_full[:, 0] = h0
        # each chunk's product of decays, exp(A * sum of its dt): no pass over the (rows, d, n) buffers
        dt_sum = F.pad(dt, (0, 0, 0, self.rows - n)).view(dt.shape[0], -1, self.chunk, dt.shape[2]).sum(2)
        totals = torch.mul(dt_sum[..., None], self.A2).exp2_()
        scan_forward(self.decay, self.h_full[:, 1:], h0, totals, self.chunk, self.work)
        return _Block(n, self.decay, self.h_full, totals)


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def scan_forward(
    decay: torch.Tensor,
    h: torch.Tensor,
    h0: torch.Tensor,
    totals: torch.Tensor,
    chunk: int,
    work: torch.Tensor,
) -> None:
    """In place along dim 1: ``h[:, t] <- decay[:, t] * h[:, t-1] + h[:, t]``, with ``h[:, -1] = h0``.

    ``decay`` and ``h`` are ``(b, rows, ...)`` with ``rows = K * chunk``; ``totals (b, K, ...)`` holds each
    chunk's product of decays; ``work`` is a ``(b, K, ...)`` buffer. Three phases: a scan of every chunk
    from zero, kept only as a running value, gives the chunk ends; a loop over the K chunks turns them
    into the true state entering each chunk; a second scan of every chunk from its entering state
    writes ``h``.
    """
    b, rows = h.shape[:2]
    k = rows // chunk
    a = decay.view(b, k, chunk, *decay.shape[2:]).unbind(2)  # the chunks' rows t, one view each
    x = h.view(b, k, chunk, *h.shape[2:]).unbind(2)
    ends = work
    ends.copy_(x[0])
    for t in range(1, chunk):  # all chunks advance together, each from a zero state
        torch.addcmul(x[t], a[t], ends, out=ends)
    entering = torch.empty_like(ends)
    entering[:, 0] = h0
    for j in range(k - 1):
        torch.addcmul(ends[:, j], totals[:, j], entering[:, j], out=entering[:, j + 1])
    x[0].addcmul_(a[0], entering)
    for t in range(1, chunk):
        x[t].addcmul_(a[t], x[t - 1])


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
    a = decay.view(b, k, chunk, *decay.shape[2:]).unbind(2)
    x = lam.view(b, k, chunk, *lam.shape[2:]).unbind(2)
    starts = work
    starts.copy_(x[-1])
    for t in range(chunk - 2, -1, -1):  # every chunk from a zero adjoint after it
        torch.addcmul(x[t], a[t + 1], starts, out=starts)
    entering = torch.empty_like(starts)  # the adjoint flowing into each chunk's last row
    entering[:, k - 1] = g_next
    a0 = a[0]
    for j in range(k - 1, 0, -1):
        torch.mul(a0[:, j], starts[:, j], out=entering[:, j - 1])
        entering[:, j - 1].addcmul_(totals[:, j], entering[:, j])
    x[-1].add_(entering)
    for t in range(chunk - 2, -1, -1):
        x[t].addcmul_(a[t + 1], x[t + 1])
    return a0[:, 0] * x[0][:, 0]
