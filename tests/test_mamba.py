"""Mamba: the CPU selective scan against a float64 sequential reference, the blocks, and MambaMIL."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from pathmil.errors import PathmilError
from pathmil.models import create_model, registry, ssm
from pathmil.models.mamba import BiMamba, Mamba, SRMamba, inverse_order, stride_order
from pathmil.models.mambamil import MambaMIL
from pathmil.models.softsort import SoftPermutation
from pathmil.models.ssm import causal_conv1d, cuda, resolve_backend, selective_scan, torch_scan
from pathmil.models.ssm.conv import causal_conv1d_torch
from pathmil.models.ssm.torch_branch import mamba_branch_torch
from pathmil.models.ssm.torch_scan import selective_scan_torch

SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """The selective scan as the paper writes it, one token at a time; channel-last (b, L, d)."""
    dt = delta if delta_bias is None else delta + delta_bias
    dt = F.softplus(dt) if delta_softplus else dt
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + u * D
    return y if z is None else y * F.silu(z)


def scan_inputs(length, d=6, n=4, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    A = (-torch.rand(d, n, generator=g, dtype=dtype) * 4 - 0.1).requires_grad_()
    return {
        "u": rand(batch, length, d),
        "delta": rand(batch, length, d, scale=0.7),
        "A": A,
        "B": rand(batch, length, n),
        "C": rand(batch, length, n),
        "D": rand(d),
        "z": rand(batch, length, d),
        "delta_bias": rand(d, scale=0.3),
    }


def value_and_grads(fn, inputs, names, seed=1):
    y = fn(**inputs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [inputs[k] for k in names], g)
    return y, dict(zip(names, grads))


def assert_close_relative(actual, expected, rtol):
    scale = expected.abs().max().clamp(min=1e-12)
    assert (actual - expected).abs().max() <= rtol * scale, (actual - expected).abs().max() / scale


# ------------------------------------------------------------------------------------------ the scan


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 200, 1000])
def test_scan_equals_sequential_reference_forward_and_gradients(length):
    inputs = scan_inputs(length)
    # blocks of 24 tokens in chunks of 8: lengths that are and are not multiples of both
    y, grads = value_and_grads(lambda **k: selective_scan_torch(**k, block=24, chunk=8), inputs, SCAN_INPUTS)
    y_ref, grads_ref = value_and_grads(reference_scan, inputs, SCAN_INPUTS)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name in SCAN_INPUTS:
        assert_close_relative(grads[name], grads_ref[name], 1e-10)


def test_scan_over_several_spans_of_several_blocks(monkeypatch):
    """Spans (per-channel work) of 2 blocks of 16 tokens, the last span and block short."""
    monkeypatch.setattr(torch_scan, "SPAN", 32)
    inputs = scan_inputs(150)
    y, grads = value_and_grads(lambda **k: selective_scan_torch(**k, block=16, chunk=4), inputs, SCAN_INPUTS)
    y_ref, grads_ref = value_and_grads(reference_scan, inputs, SCAN_INPUTS)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name in SCAN_INPUTS:
        assert_close_relative(grads[name], grads_ref[name], 1e-10)


def test_scan_float32_with_default_blocks_is_close_to_float64_reference():
    inputs64 = scan_inputs(300, d=64, n=16, batch=1)
    inputs32 = {k: v.detach().float().requires_grad_() for k, v in inputs64.items()}
    y, grads = value_and_grads(selective_scan_torch, inputs32, SCAN_INPUTS)
    y_ref, grads_ref = value_and_grads(reference_scan, inputs64, SCAN_INPUTS)
    assert y.dtype == torch.float32
    assert_close_relative(y.double(), y_ref, 1e-5)
    for name in SCAN_INPUTS:
        assert grads[name].dtype == torch.float32
        assert_close_relative(grads[name].double(), grads_ref[name], 1e-4)


@pytest.mark.parametrize("softplus", [True, False])
def test_scan_gradcheck(softplus):
    inputs = scan_inputs(13, d=3, n=2, batch=2)
    if not softplus:  # keep dt positive without the softplus
        inputs["delta"] = (inputs["delta"].detach().abs() + 0.1).requires_grad_()
    args = [inputs[k] for k in SCAN_INPUTS]

    def fn(*a):
        return selective_scan_torch(*a, delta_softplus=softplus, block=8, chunk=4)

    assert torch.autograd.gradcheck(fn, args)


def test_scan_without_optional_inputs():
    inputs = scan_inputs(37)
    for name in ("D", "z", "delta_bias"):
        inputs[name] = None
    names = ("u", "delta", "A", "B", "C")
    y, grads = value_and_grads(lambda **k: selective_scan_torch(**k, block=16, chunk=4), inputs, names)
    y_ref, grads_ref = value_and_grads(reference_scan, inputs, names)
    torch.testing.assert_close(y, y_ref)
    for name in names:
        torch.testing.assert_close(grads[name], grads_ref[name])


def test_public_scan_takes_mamba_ssm_layout():
    """(b, d, L) tensors, contiguous or transposed views, as mamba-ssm's selective_scan_fn."""
    inputs = scan_inputs(29)
    expected = reference_scan(**inputs)
    layout = {k: v.detach().transpose(1, 2).contiguous() if v.dim() == 3 else v for k, v in inputs.items()}
    y = selective_scan(**layout, backend="torch")
    assert y.shape == (2, 6, 29)
    torch.testing.assert_close(y.transpose(1, 2), expected)
    views = {k: v.transpose(1, 2) if v.dim() == 3 else v for k, v in inputs.items()}
    torch.testing.assert_close(selective_scan(**views).transpose(1, 2), expected)


# ------------------------------------------------------------------------------------ the causal conv


def reference_conv(x, weight, bias, silu):
    """torch's Conv1d, as mamba-ssm uses it without the CUDA kernel; x (b, d, L)."""
    length = x.shape[-1]
    out = F.conv1d(x, weight[:, None], bias, padding=weight.shape[1] - 1, groups=x.shape[1])[..., :length]
    return F.silu(out) if silu else out


@pytest.mark.parametrize("length", [1, 2, 7, 40])
@pytest.mark.parametrize("silu", [True, False])
def test_causal_conv_equals_conv1d(length, silu):
    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    ours = causal_conv1d(x.mT, weight, bias, silu=silu)  # channel-last storage, (b, d, L) view
    ref = reference_conv(x.mT, weight, bias, silu)
    torch.testing.assert_close(ours, ref)
    g_out = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(ours, (x, weight, bias), g_out),
        torch.autograd.grad(ref, (x, weight, bias), g_out),
    ):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_torch(*a, silu=silu), (x, weight, bias))


# ------------------------------------------------------------------------------------------ backends


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(cuda, "scan_available", lambda: False)
    assert resolve_backend("auto", on_gpu=False) == "torch"
    assert resolve_backend("auto", on_gpu=True) == "torch"
    assert resolve_backend("torch", on_gpu=True) == "torch"
    with pytest.raises(PathmilError, match="pip install"):
        resolve_backend("cuda", on_gpu=True)
    with pytest.raises(PathmilError, match="CUDA GPU"):
        resolve_backend("cuda", on_gpu=False)
    with pytest.raises(PathmilError, match="unknown Mamba backend"):
        resolve_backend("triton", on_gpu=False)
    monkeypatch.setattr(cuda, "scan_available", lambda: True)
    assert resolve_backend("auto", on_gpu=True) == "cuda"
    assert resolve_backend("auto", on_gpu=False) == "torch"
    assert resolve_backend("cuda", on_gpu=True) == "cuda"


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    inputs = {k: v.detach().transpose(1, 2) if v.dim() == 3 else v for k, v in scan_inputs(5).items()}
    with pytest.raises(PathmilError, match="CUDA GPU"):
        selective_scan(**inputs, backend="cuda")
    with pytest.raises(PathmilError, match="CUDA GPU"):
        Mamba(8, d_state=4, backend="cuda")(torch.randn(1, 5, 8))


def stand_in_kernels(monkeypatch, calls: list[str], conv: bool = True) -> None:
    """mamba-ssm's ``selective_scan_fn`` and causal-conv1d's ``causal_conv1d_fn`` as importable stand-ins
    with the kernels' signatures and type checks (selective_scan.cpp, causal_conv1d.cpp), computed by the
    references here. The stand-ins append "scan" or "conv" to ``calls``."""
    halves = (torch.float32, torch.float16, torch.bfloat16)

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        calls.append("scan")
        if u.dtype == torch.float64:  # the stand-in also takes float64, for exact comparisons
            halves_here = (torch.float64,)
        else:
            halves_here = halves
            assert A.dtype == torch.float32 and all(
                t is None or t.dtype == torch.float32 for t in (D, delta_bias)
            )
        assert u.dtype in halves_here, u.dtype
        for name, t in {"delta": delta, "B": B, "C": C, "z": z}.items():
            if t is not None and t.dtype != u.dtype:
                raise RuntimeError(f"Expected {name}.scalar_type() == input_type to be true, but got false.")
        cl = [t.transpose(1, 2).double() for t in (u, delta, B, C, z)]
        args = [None if t is None else t.double() for t in (A, D, delta_bias)]
        y = reference_scan(cl[0], cl[1], args[0], cl[2], cl[3], args[1], cl[4], args[2], delta_softplus)
        return y.mT.to(u.dtype)

    def causal_conv1d_fn(x, weight, bias=None, activation=None):
        calls.append("conv")
        assert bias is None or bias.dtype == weight.dtype
        out = reference_conv(
            x.double(), weight.double(), None if bias is None else bias.double(), activation == "silu"
        )
        return out.to(x.dtype)

    scan_module = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    scan_module.selective_scan_fn = selective_scan_fn
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", scan_module)
    if conv:
        conv_module = types.ModuleType("causal_conv1d")
        conv_module.causal_conv1d_fn = causal_conv1d_fn
        monkeypatch.setitem(sys.modules, "causal_conv1d", conv_module)
    else:
        monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # import fails
    cuda._scan_kernel.cache_clear()
    cuda._conv_kernel.cache_clear()


@pytest.fixture
def clear_kernel_cache():
    yield
    cuda._scan_kernel.cache_clear()
    cuda._conv_kernel.cache_clear()


def test_cuda_wrappers_call_the_kernels_with_mamba_ssm_arguments(monkeypatch, clear_kernel_cache):
    """The GPU kernels cannot run here: stand-ins with their signatures check what the wrappers pass."""
    calls = []
    stand_in_kernels(monkeypatch, calls)
    assert cuda.scan_available() and cuda.conv_available()
    inputs = {k: v.detach().transpose(1, 2) if v.dim() == 3 else v for k, v in scan_inputs(21).items()}
    torch.testing.assert_close(cuda.selective_scan(**inputs), selective_scan(**inputs, backend="torch"))
    x, w = torch.randn(2, 6, 11, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(cuda.causal_conv1d(x, w, None, True), causal_conv1d(x, w, silu=True))
    assert calls == ["scan", "conv"]
    # the GPU composition of a block's branch (gather, conv, projections, scan, put back), on CPU
    monkeypatch.setattr(ssm, "resolve_backend", lambda backend, on_gpu: "cuda")
    branch = branch_inputs(23)
    order = stride_order(23, 5)
    torch.testing.assert_close(
        ssm.mamba_branch(*branch.values(), order=order, backend="cuda"),
        mamba_branch_torch(*branch.values(), order=order),
    )
    assert calls == ["scan", "conv", "conv", "scan"]


@pytest.mark.parametrize("conv_kernel", [True, False], ids=["causal-conv1d", "no causal-conv1d"])
def test_kernel_branch_under_bf16_autocast_gives_the_kernels_one_type(
    conv_kernel, monkeypatch, clear_kernel_cache
):
    """Training on CUDA runs under bf16 autocast: the projections come out in bf16 while the PyTorch conv
    (used without causal-conv1d) promotes to its float32 weight. mamba-ssm's kernel refuses mixed types
    ("Expected delta.scalar_type() == input_type", seen on an H200, 2026-11-30): the branch hands it one
    type, and its output stays within bf16 rounding of the float32 branch."""
    calls = []
    stand_in_kernels(monkeypatch, calls, conv=conv_kernel)
    monkeypatch.setattr(ssm, "resolve_backend", lambda backend, on_gpu: "cuda")
    inputs = {k: v.detach().float() for k, v in branch_inputs(29).items()}
    reference = mamba_branch_torch(*inputs.values())
    x, z = inputs["x"].bfloat16(), inputs["z"].bfloat16()  # as in_proj gives them under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ssm.mamba_branch(x, z, *list(inputs.values())[2:], backend="cuda")
    assert y.dtype == torch.bfloat16
    assert calls == (["conv", "scan"] if conv_kernel else ["scan"])
    assert float((y.float() - reference).norm() / reference.norm()) < 3e-2


# ---------------------------------------------------------------------------------------- the blocks


def mamba_ssm_state_dict(d_model=16, d_state=4, d_conv=4, expand=2, seed=0):
    """A state dict with the keys and shapes of mamba-ssm's Mamba(d_model, d_state, d_conv, expand)."""
    g = torch.Generator().manual_seed(seed)
    d_inner, rank = expand * d_model, math.ceil(d_model / 16)
    shapes = {
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, rank),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    return {k: torch.randn(s, generator=g) * 0.5 for k, s in shapes.items()}


def reference_block(sd, x):
    """mamba-ssm's Mamba forward written out with the reference scan (float64)."""
    sd = {k: v.double() for k, v in sd.items()}
    d_inner, rank = sd["D"].shape[0], sd["dt_proj.weight"].shape[1]
    n = sd["A_log"].shape[1]
    xin, z = (x.double() @ sd["in_proj.weight"].T).chunk(2, dim=-1)
    u = reference_conv(xin.mT, sd["conv1d.weight"][:, 0], sd["conv1d.bias"], True).mT
    dt, B, C = (u @ sd["x_proj.weight"].T).split([rank, n, n], dim=-1)
    y = reference_scan(
        u, dt @ sd["dt_proj.weight"].T, -torch.exp(sd["A_log"]), B, C, sd["D"], z, sd["dt_proj.bias"]
    )
    assert y.shape[-1] == d_inner
    return y @ sd["out_proj.weight"].T


def test_mamba_ssm_state_dict_loads_and_computes_mamba():
    sd = mamba_ssm_state_dict()
    block = Mamba(16, d_state=4)
    block.load_state_dict(sd, strict=True)
    x = torch.randn(2, 37, 16, generator=torch.Generator().manual_seed(0))
    assert_close_relative(block(x).double(), reference_block(sd, x), 1e-5)


def test_mambapy_agrees_with_reference_and_with_our_block():
    """mambapy (same parameter names) as an independent cross-check of the block and of the scan."""
    from mambapy.mamba import MambaBlock, MambaConfig

    torch.manual_seed(0)
    theirs = MambaBlock(MambaConfig(d_model=16, n_layers=1, d_state=4))
    ours = Mamba(16, d_state=4)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 50, 16)
    expected = reference_block(theirs.state_dict(), x)
    torch.testing.assert_close(theirs(x).double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours(x).double(), expected, rtol=1e-4, atol=1e-5)
    inputs = scan_inputs(50, batch=1, dtype=torch.float32)
    dt = F.softplus(inputs["delta"] + inputs["delta_bias"])
    y = theirs.selective_scan(inputs["u"], dt, inputs["A"], inputs["B"], inputs["C"], inputs["D"])
    no_gate = {**inputs, "z": None}
    torch.testing.assert_close(y, reference_scan(**no_gate), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("length", "rate"), [(1, 10), (7, 3), (10, 5), (23, 10), (64, 5), (101, 10)])
def test_stride_order_is_the_padded_transpose_and_inverts(length, rate):
    order = stride_order(length, rate)
    # pad to K * R, view (K, R), transpose, flatten, drop the padding: sorted by (i mod R, i div R)
    expected = sorted(range(length), key=lambda i: (i % rate, i // rate))
    assert order.tolist() == expected
    x = torch.randn(2, length, 3)
    assert torch.equal(x[:, order][:, inverse_order(order)], x)
    assert torch.equal(inverse_order(order)[order], torch.arange(length))


@pytest.mark.parametrize("length", [12, 23])
def test_sr_branch_scans_exactly_the_real_tokens_in_stride_order(length):
    """No padding token ever enters the reordered branch: SR-Mamba equals its two branches composed by hand."""
    torch.manual_seed(0)
    block = SRMamba(16, rate=5, d_state=4)
    x = torch.randn(2, length, 16)
    xin, z = block.in_proj(x).chunk(2, dim=-1)
    first = block._branch(xin, z, block.conv1d, block.x_proj, block.dt_proj, block.A_log, block.D)
    order = torch.tensor(sorted(range(length), key=lambda i: (i % 5, i // 5)))
    params = (block.conv1d_b, block.x_proj_b, block.dt_proj_b, block.A_b_log, block.D_b)
    second = torch.empty_like(first)
    second[:, order] = block._branch(xin[:, order], z[:, order], *params)
    torch.testing.assert_close(block(x), block.out_proj(first + second))


def test_bimamba_second_branch_reads_the_sequence_backwards():
    torch.manual_seed(0)
    block = BiMamba(16, d_state=4)
    x = torch.randn(1, 9, 16)
    xin, z = block.in_proj(x).chunk(2, dim=-1)
    first = block._branch(xin, z, block.conv1d, block.x_proj, block.dt_proj, block.A_log, block.D)
    params = (block.conv1d_b, block.x_proj_b, block.dt_proj_b, block.A_b_log, block.D_b)
    second = block._branch(xin.flip(1), z.flip(1), *params).flip(1)
    torch.testing.assert_close(block(x), block.out_proj(first + second))


def composed_branch(x, z, conv_w, conv_b, wx, wdt, dt_bias, A, D, order=None):
    """A Mamba branch composed of the separately tested pieces, differentiated by autograd."""
    if order is not None:
        x, z = x[:, order], z[:, order]
    u = causal_conv1d_torch(x, conv_w, conv_b, silu=True)
    dt, B, C = F.linear(u, wx).split([wdt.shape[1], A.shape[1], A.shape[1]], dim=-1)
    y = selective_scan_torch(u, F.linear(dt, wdt), A, B, C, D, z, dt_bias, block=8, chunk=4)
    return y if order is None else y[:, inverse_order(order)]


BRANCH_INPUTS = ("x", "z", "conv_w", "conv_b", "wx", "wdt", "dt_bias", "A", "D")


def branch_inputs(length, d=6, n=3, rank=2, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    shapes = {"conv_w": (d, k), "conv_b": (d,), "wx": (rank + 2 * n, d), "wdt": (d, rank), "dt_bias": (d,)}
    inputs = {"x": rand(2, length, d, scale=1.0), "z": rand(2, length, d, scale=1.0)}
    inputs.update({name: rand(*shape) for name, shape in shapes.items()})
    inputs["A"] = (-torch.rand(d, n, generator=g, dtype=torch.float64) * 2 - 0.1).requires_grad_()
    inputs["D"] = rand(d)
    return inputs


@pytest.mark.parametrize("length", [1, 3, 17, 37])
@pytest.mark.parametrize("kind", ["in order", "stride", "reversed"])
def test_fused_branch_equals_its_pieces_composed(length, kind, monkeypatch):
    """The blockwise branch (conv look-back across spans, per-span gathers) against the composition."""
    monkeypatch.setattr(torch_scan, "SPAN", 16)  # spans of 2 blocks of 8 tokens
    order = {"in order": None, "stride": stride_order(length, 3), "reversed": torch.arange(length)}[kind]
    if kind == "reversed":
        order = order.flip(0)
    inputs = branch_inputs(length)
    y, grads = value_and_grads(
        lambda **k: mamba_branch_torch(*k.values(), order=order, block=8, chunk=4), inputs, BRANCH_INPUTS
    )
    y_ref, grads_ref = value_and_grads(
        lambda **k: composed_branch(*k.values(), order=order), inputs, BRANCH_INPUTS
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name in BRANCH_INPUTS:
        assert_close_relative(grads[name], grads_ref[name], 1e-10)


def test_fused_branch_gradcheck():
    inputs = branch_inputs(11, d=3, n=2, rank=1)
    order = stride_order(11, 4)
    assert torch.autograd.gradcheck(
        lambda *a: mamba_branch_torch(*a, order=order, block=4, chunk=2), tuple(inputs.values())
    )


# ------------------------------------------------------------------------------------------- MambaMIL


def small_model(n_outputs=3, seed=0, **settings):
    torch.manual_seed(seed)
    defaults = {"d_model": 16, "d_state": 4, "attn_dim": 8, "sr_rate": 5, "dropout": 0.0}
    return create_model("mambamil", in_dim=12, n_outputs=n_outputs, **{**defaults, **settings}).eval()


VARIANTS = [
    {"variant": "sr"},
    {"variant": "plain"},
    {"variant": "bi"},
    {"token_reorder": True},
    {"positive_definite": True},
]


@pytest.mark.parametrize("settings", VARIANTS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_mambamil_output_shapes(settings, n):
    model = small_model(**settings)
    out = model(torch.randn(2, n, 12))
    assert out.logits.shape == (2, 3)
    assert out.embedding.shape == (2, 16)
    assert out.instance_scores.shape == (2, n)
    assert out.instance_embeddings.shape == (2, n, 16)
    torch.testing.assert_close(out.instance_scores.sum(1), torch.ones(2))


@pytest.mark.parametrize("settings", VARIANTS, ids=lambda s: "-".join(map(str, s.values())))
def test_mambamil_padding_never_changes_the_output(settings):
    model = small_model(**settings)
    bags = [torch.randn(1, n, 12) for n in (11, 4, 17)]
    alone = [model(bag) for bag in bags]
    x = torch.full((3, 20, 12), 1e4)  # padded positions hold junk
    mask = torch.zeros(3, 20, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : bag.shape[1]] = bag[0]
        mask[i, : bag.shape[1]] = True
    batched = model(x, mask)
    for i, (bag, out) in enumerate(zip(bags, alone)):
        n = bag.shape[1]
        torch.testing.assert_close(batched.logits[i], out.logits[0])
        torch.testing.assert_close(batched.embedding[i], out.embedding[0])
        torch.testing.assert_close(batched.instance_scores[i, :n], out.instance_scores[0])
        assert torch.all(batched.instance_scores[i, n:] == 0)
        assert torch.all(batched.instance_embeddings[i, n:] == 0)


def test_mambamil_equal_length_batch_equals_bags_alone():
    model = small_model()
    x = torch.randn(3, 13, 12)
    batched = model(x)
    for i in range(3):
        torch.testing.assert_close(batched.logits[i], model(x[i : i + 1]).logits[0])


def test_mambamil_empty_bag_is_a_clear_error():
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(PathmilError, match="no instances"):
        small_model()(torch.randn(2, 5, 12), mask)


def test_mambamil_outputs_do_not_depend_on_the_scan_backend(monkeypatch):
    """The blockwise CPU branch inside the whole model gives what the sequential reference gives."""
    model = small_model()
    x = torch.randn(1, 45, 12)
    expected = model(x)

    def reference(x, z, conv_w, conv_b, wx, wdt, dt_bias, A, D, order=None, backend="auto"):
        x, z, conv_w, conv_b, wx, wdt, dt_bias, A, D = (
            t.double() for t in (x, z, conv_w, conv_b, wx, wdt, dt_bias, A, D)
        )
        if order is not None:
            x, z = x[:, order], z[:, order]
        u = reference_conv(x.mT, conv_w, conv_b, True).mT
        dt, B, C = (u @ wx.T).split([wdt.shape[1], A.shape[1], A.shape[1]], dim=-1)
        y = reference_scan(u, dt @ wdt.T, A, B, C, D, z, dt_bias)
        return (y if order is None else y[:, inverse_order(order)]).float()

    monkeypatch.setattr("pathmil.models.mamba.mamba_branch", reference)
    got = model(x)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.instance_scores, expected.instance_scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("settings", VARIANTS, ids=lambda s: "-".join(map(str, s.values())))
def test_mambamil_gradients_reach_every_parameter(settings):
    model = small_model(**settings).train()
    out = model(torch.randn(2, 19, 12))
    F.cross_entropy(out.logits, torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name == "attention.2.bias":
            # the score layer's bias shifts every instance's score alike: softmax ignores it, so its
            # gradient is zero up to rounding (exactly zero on some draws)
            assert p.grad.abs().sum() < 1e-6, name
            continue
        if settings.get("positive_definite") and ".x_proj" in name:
            rank, n = model.layers[0][1].dt_rank, 4
            assert p.grad[rank : rank + n].abs().sum() == 0, name  # S_B rows: tied to S_C, unused
            assert p.grad[:rank].abs().sum() > 0 and p.grad[rank + n :].abs().sum() > 0, name
            continue
        assert p.grad.abs().sum() > 0, name


def test_mambamil_eval_is_deterministic():
    model = small_model(dropout=0.25)
    x = torch.randn(2, 30, 12)
    first, second = model(x), model(x)
    assert torch.equal(first.logits, second.logits)
    assert torch.equal(first.instance_scores, second.instance_scores)


def test_token_reorder_makes_the_model_blind_to_input_order():
    """Sorting by a learned score before the scans, and back after: permuting the bag permutes the scores."""
    model = small_model(token_reorder=True, variant="plain")
    x = torch.randn(1, 25, 12)
    perm = torch.randperm(25)
    out, out_perm = model(x), model(x[:, perm])
    torch.testing.assert_close(out_perm.logits, out.logits)
    torch.testing.assert_close(out_perm.instance_scores, out.instance_scores[:, perm])
    plain = small_model(variant="plain")
    assert not torch.allclose(plain(x[:, perm]).logits, plain(x).logits)


def test_soft_sort_is_the_softsort_matrix_and_hardens_as_tau_falls():
    """Full SoftSort (Prillo and Eisenschlos 2020) for short bags, its exact band for long ones, a hard
    sort as tau -> 0, and gradients that reach the scores."""
    torch.manual_seed(0)
    scores = torch.randn(2, 30, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 30, 5, dtype=torch.float64)
    ranked, order = scores.sort(dim=1)
    dense = torch.softmax(-(ranked[:, :, None] - scores[:, None, :]).abs() / 0.5, dim=-1)
    full = SoftPermutation(scores, tau=0.5, window=64)
    torch.testing.assert_close(full.sort(x), dense @ x)
    torch.testing.assert_close(full.unsort(x), dense.mT @ x)
    band = torch.zeros(2, 30, 30, dtype=torch.float64)  # row i: ranks i - 4 ... i + 4 only
    for b in range(2):
        for i in range(30):
            ranks = [r for r in range(i - 4, i + 5) if 0 <= r < 30]
            weights = torch.softmax(
                torch.stack([-(ranked[b, i] - ranked[b, r]).abs() / 0.5 for r in ranks]), 0
            )
            band[b, i, order[b, ranks]] = weights
    banded = SoftPermutation(scores, tau=0.5, window=4)
    torch.testing.assert_close(banded.sort(x), band @ x)
    torch.testing.assert_close(banded.unsort(x), band.mT @ x)
    hard = SoftPermutation(scores, tau=1e-4, window=4)
    torch.testing.assert_close(hard.sort(x), x.gather(1, order[..., None].expand_as(x)))
    torch.testing.assert_close(hard.unsort(hard.sort(x)), x)
    (banded.sort(x).square().sum() + full.unsort(x).square().sum()).backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="tau"):
        SoftPermutation(scores, tau=0.0)


def test_token_reorder_scans_softly_sorted_tokens_and_puts_outputs_back():
    """h <- h + P^T block(P LayerNorm(h)) in every layer, P the SoftSort of the layer's importance scores."""
    model = small_model(token_reorder=True, variant="plain", n_layers=2, reorder_tau=0.3)
    x = torch.randn(1, 20, 12)
    h = model._fc1(x)
    for i, (norm, block) in enumerate(model.layers):
        u = norm(h)
        p = SoftPermutation(model.importance[i](u).squeeze(-1), tau=0.3)
        h = h + p.weights.mT @ block(p.weights @ u)
    out = model(x)
    torch.testing.assert_close(out.instance_embeddings, model.norm(h))
    assert len(model.importance) == 2


def test_positive_definite_keeps_the_input_output_projection_positive_semidefinite():
    """Vo et al. (ICLR 2025): S_C^T S_B has no negative eigenvalue, before and after training steps."""
    model = small_model(positive_definite=True, variant="sr").train()
    block = model.layers[0][1]
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(2):
        for x_proj, scale in ((block.x_proj, block.pd_scale), (block.x_proj_b, block.pd_scale_b)):
            w = block._x_proj_weight(x_proj, scale).detach().double()
            s_b, s_c = w[block.dt_rank : block.dt_rank + 4], w[block.dt_rank + 4 :]
            product = s_c.T @ s_b
            torch.testing.assert_close(product, product.T)
            eigenvalues = torch.linalg.eigvalsh(product)
            assert eigenvalues.min() > -1e-6 * eigenvalues.max()  # float32 rounding only
        loss = F.cross_entropy(model(torch.randn(1, 15, 12)).logits, torch.tensor([1]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    plain = small_model(variant="sr").layers[0][1]
    w = plain.x_proj.weight.detach().double()
    product = w[plain.dt_rank + 4 :].T @ w[plain.dt_rank : plain.dt_rank + 4]
    assert torch.linalg.eigvalsh(product + product.T).min() < -1e-3  # without the option: indefinite
    assert not any("pd_scale" in k for k in small_model().state_dict())  # default: mamba-ssm's keys


def test_mambamil_learns_a_marker_instance():
    """Label = whether a bag holds a marker instance: the training loss falls and every bag is fitted.

    Held-out accuracy is not asserted: with a few dozen toy bags it swings with the initialisation
    seed (so does ABMIL's with the authors' Xavier initialisation), which would make a brittle test.
    """
    g = torch.Generator().manual_seed(0)
    marker = torch.zeros(12)
    marker[0] = 4.0
    bags = []
    for i in range(16):
        bag = torch.randn(1, 16, 12, generator=g)
        if i % 2:
            bag[0, int(torch.randint(16, (1,), generator=g))] += marker
        bags.append((bag, torch.tensor([i % 2])))
    model = small_model(n_outputs=2)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    def mean_loss():
        model.eval()
        with torch.no_grad():
            return sum(F.cross_entropy(model(x).logits, y).item() for x, y in bags) / len(bags)

    first = mean_loss()
    for _ in range(6):
        model.train()
        for x, y in bags:
            optimiser.zero_grad()
            F.cross_entropy(model(x).logits, y).backward()
            optimiser.step()
    assert mean_loss() < 0.2 * first
    with torch.no_grad():
        assert all(int(model(x).logits.argmax()) == int(y) for x, y in bags)


@pytest.mark.parametrize("settings", [{"variant": "sr"}, {"variant": "bi"}], ids=["sr", "bi"])
def test_mambamil_parameter_gradients_match_finite_differences(settings):
    """The whole model in float64: autograd (through the custom scan and conv) against central differences."""
    model = small_model(n_outputs=2, **settings).double()
    x = torch.randn(1, 13, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.tensor([1])

    def loss():
        return F.cross_entropy(model(x).logits, target)

    params = list(model.parameters())
    grads = torch.autograd.grad(loss(), params)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        eps = 1e-6
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(eps * v)
            up = loss()
            for p, v in zip(params, direction):
                p.sub_(2 * eps * v)
            down = loss()
            for p, v in zip(params, direction):
                p.add_(eps * v)
        numeric = (up - down) / (2 * eps)
        analytic = sum((gr * v).sum() for gr, v in zip(grads, direction))
        assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic)), (numeric, analytic)


def test_create_model_builds_mambamil_from_settings():
    model = registry.create_model("mambamil", in_dim=12, n_outputs=4, d_model=16, variant="bi", sr_rate=5)
    assert isinstance(model, MambaMIL) and isinstance(model.layers[0][1], BiMamba)
    assert model(torch.randn(1, 6, 12)).logits.shape == (1, 4)
    with pytest.raises(PathmilError, match=r"unknown setting model\.rate"):
        registry.create_model("mambamil", in_dim=12, n_outputs=2, rate=5)
    with pytest.raises(PathmilError, match="variant"):
        registry.create_model("mambamil", in_dim=12, n_outputs=2, variant="sideways")


def test_default_mambamil_has_the_papers_shape_and_the_authors_names():
    model = MambaMIL(1024, 2)
    blocks = [layer[1] for layer in model.layers]
    assert len(blocks) == 2 and all(isinstance(b, SRMamba) and b.rate == 10 for b in blocks)
    assert (blocks[0].d_inner, blocks[0].d_state, blocks[0].dt_rank) == (1024, 16, 32)
    names = set(model.state_dict())
    for key in (
        "_fc1.0.weight",
        "layers.1.0.weight",
        "layers.1.1.in_proj.weight",
        "layers.1.1.conv1d_b.weight",
        "layers.1.1.A_b_log",
        "layers.1.1.D_b",
        "norm.weight",
        "attention.2.weight",
        "classifier.weight",
    ):
        assert key in names, key


# ------------------------------------------------------------------------------------------ on a GPU


def scan_outputs(
    model: torch.nn.Module, x: torch.Tensor, backend: str, bf16: bool
) -> dict[str, torch.Tensor]:
    """What the scan backend decides: MambaMIL's logits, the input's gradient and the gradients of the
    Mamba blocks' parameters (float32). Gradients outside the blocks (layer norms, the attention's bias,
    whose true gradient is zero) depend on the scan only through these."""
    for layer in model.modules():
        if hasattr(layer, "backend"):
            layer.backend = backend
    model.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x).logits
    logits.float().sum().backward()
    blocks = {
        f"{name}.{p}": param.grad.float().clone()
        for name, block in model.named_modules()
        if isinstance(block, Mamba)
        for p, param in block.named_parameters()
    }
    return {"logits": logits.detach().float(), "x.grad": x.grad.float(), **blocks}


def relative_errors(result: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((result[k] - r).norm() / r.norm().clamp_min(1e-12)) for k, r in reference.items()}


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda.scan_available()),
    reason="needs a CUDA GPU with mamba-ssm installed (pip install 'pathmil[mamba]'); none here",
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_kernels_equal_the_pytorch_scan_on_a_gpu(precision):
    """MambaMIL on the GPU: mamba-ssm's kernels and the PyTorch scan give the same outputs and gradients.

    5,000 instances span several of the kernels' 2,048-token chunks. In float32 the backends agree to 1e-3
    (relative norm of the difference); under bf16 autocast, as training runs on CUDA, each backend stays
    within 5e-2 of the float32 result (the PyTorch scan under CPU bf16 autocast: at most 2e-2).
    """
    torch.manual_seed(0)
    model = create_model("mambamil", in_dim=64, n_outputs=2, d_model=64, d_state=8, dropout=0.0).cuda()
    x = torch.randn(1, 5000, 64, device="cuda")
    reference = scan_outputs(model, x, "torch", bf16=False)
    assert len(reference) > 20  # logits, x.grad and the blocks' parameters
    backends = ["cuda"] if precision == "fp32" else ["torch", "cuda"]
    bound = 1e-3 if precision == "fp32" else 5e-2
    for backend in backends:
        errors = relative_errors(scan_outputs(model, x, backend, bf16=precision == "bf16"), reference)
        worst = max(errors, key=errors.get)
        assert errors[worst] < bound, (backend, worst, errors[worst])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none here")
def test_token_reorder_and_positive_definite_on_a_gpu():
    """The SoftSort reordering (exact, and banded past reorder_window) and the tied projections run on a
    GPU with the PyTorch scan and give the CPU's outputs and gradients; under bf16 autocast they stay finite."""
    for n in (40, 300):
        torch.manual_seed(0)
        settings = {"d_model": 32, "d_state": 8, "dropout": 0.0, "backend": "torch"}
        model = create_model(
            "mambamil", in_dim=32, n_outputs=2, token_reorder=True, positive_definite=True, **settings
        )
        x = torch.randn(1, n, 32)
        results = []
        for device in ("cpu", "cuda"):
            model.to(device).zero_grad()
            out = model(x.to(device))
            out.logits.sum().backward()
            results.append((out.logits.detach().cpu(), [p.grad.detach().cpu() for p in model.parameters()]))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
        for gpu_grad, cpu_grad in zip(results[1][1], results[0][1], strict=True):
            torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-3, atol=1e-5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x.cuda())
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.instance_scores).all()
