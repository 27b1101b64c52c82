"""MambaMIL on CPU: forward-backward time and peak memory per bag size, and the scan against a plain loop.

1. ``mambamil`` with its defaults (SR-Mamba, rate 10, 2 layers, d_model 512, d_inner 1024, d_state 16):
   one forward + backward pass (cross-entropy) on one bag of N x 1024 features, N = 1,000 / 10,000 /
   100,000. Cost should grow linearly in N: the table gives seconds per 1,000 instances.
2. One selective scan (d_inner 1024, d_state 16, with z, D, delta_bias), forward + backward, at L =
   10,000: the blocked scan of ``pathmil.models.ssm`` against a plain sequential loop over the tokens
   with autograd (per-token discretisation; slices taken with ``unbind``, since indexing ``x[:, t]`` in
   the loop makes autograd's backward quadratic in L; discretising all tokens before the loop was slower,
   23 s against 13 s at L = 10,000, and took 7 GB). Both are timed for real at the same L, interleaved.
3. ``--tune``: the scan's block and chunk sizes at L = 4,096.

Each case runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own; the
baseline of a process that imported torch and built the model is given beside it. Usage:

    python benchmarks/bench_mamba.py [--sizes 1000 10000 100000] [--loop-len 10000] [--repeats 3]
                                     [--threads N] [--tune] [--out benchmarks/out/bench_mamba.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
D_INNER, D_STATE = 1024, 16


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model():
    import torch

    from pathmil.models import create_model

    torch.manual_seed(0)
    return create_model("mambamil", in_dim=1024, n_outputs=2)


def case_baseline() -> dict:
    _model()
    return {"peak_rss_mb": peak_rss_mb()}


def case_bag(n: int) -> dict:
    import torch

    model = _model()
    x = torch.randn(1, n, 1024)
    target = torch.tensor([1])
    repeats = 3 if n <= 10_000 else 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x).logits, target)
        loss.backward()
        model.zero_grad()
        times.append(time.perf_counter() - start)
    return {"n": n, "seconds": min(times), "peak_rss_mb": peak_rss_mb()}


def _scan_inputs(length: int):
    import torch

    torch.manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).requires_grad_()

    u, z = leaf(1, length, D_INNER), leaf(1, length, D_INNER)
    delta = leaf(1, length, D_INNER, scale=0.5)
    B, C = leaf(1, length, D_STATE), leaf(1, length, D_STATE)
    A = (-torch.rand(D_INNER, D_STATE) * D_STATE).requires_grad_()
    D, bias = leaf(D_INNER), leaf(D_INNER, scale=0.1)
    return u, delta, A, B, C, D, z, bias


def plain_loop(u, delta, A, B, C, D, z, bias):
    """The selective scan as a sequential loop over tokens, differentiated by autograd (the baseline)."""
    import torch
    import torch.nn.functional as F

    dt = F.softplus(delta + bias)
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for u_t, dt_t, b_t, c_t in zip(u.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * b_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    return (torch.stack(ys, 1) + u * D) * F.silu(z)


def case_scan(kind: str, length: int, block: int = 0, chunk: int = 0) -> dict:
    import torch

    from pathmil.models.ssm.torch_scan import CHUNK, selective_scan_torch

    inputs = _scan_inputs(length)
    if kind == "loop":
        fn = plain_loop
    else:

        def fn(*args):
            return selective_scan_torch(*args, block=block or None, chunk=chunk or CHUNK)

    cotangent = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    fn(*(t[:, :64] if t.dim() == 3 else t for t in inputs)).backward(cotangent[:, :64])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    y = fn(*inputs)
    forward = time.perf_counter() - start
    y.backward(cotangent)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "kind": kind,
        "length": length,
        "forward": forward,
        "seconds": total,
        "cpu_seconds": cpu,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_case(threads: int | None, *args: str) -> dict:
    command = [sys.executable, __file__, "--case", *args]
    if threads:
        command += ["--threads", str(threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def machine(threads: int | None) -> str:
    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch.set_num_threads(threads or torch.get_num_threads())
    return (
        f"{name}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"thread(s); {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--loop-len", type=int, default=10_000, help="L of the scan-vs-loop comparison")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved scan / loop runs (default 3)")
    parser.add_argument("--tune", action="store_true", help="also compare block/chunk sizes of the scan")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "bench_mamba.md")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        name, *rest = args.case
        cases = {
            "baseline": case_baseline,
            "bag": lambda: case_bag(int(rest[0])),
            "scan": lambda: case_scan(rest[0], *map(int, rest[1:])),
        }
        print(json.dumps(cases[name]()))
        return

    lines = [f"Machine: {machine(args.threads)}", "", f"Load average before: {load()}", ""]
    raw: dict = {"machine": machine(args.threads), "load_before": load()}
    baseline = raw["baseline"] = run_case(args.threads, "baseline")
    lines += [
        "`mambamil` (defaults: SR-Mamba rate 10, 2 layers, d_model 512, d_inner 1024, d_state 16), one "
        "bag, forward + backward:",
        "",
        f"Baseline process (python + torch + model built): peak RSS {baseline['peak_rss_mb']:.0f} MB.",
        "",
        "| instances N | seconds | seconds per 1,000 instances | peak RSS (MB) | above baseline (MB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    raw["bags"] = []
    for n in args.sizes:
        r = run_case(args.threads, "bag", str(n))
        raw["bags"].append(r)
        lines.append(
            f"| {n:,} | {r['seconds']:.2f} | {r['seconds'] / n * 1000:.3f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] - baseline['peak_rss_mb']:.0f} |"
        )
    runs: dict[str, list[dict]] = {"scan": [], "loop": []}
    for _ in range(args.repeats):  # interleaved, so that a load spike hits both alike
        for kind in runs:
            runs[kind].append(run_case(args.threads, "scan", kind, str(args.loop_len)))
    raw["scan_vs_loop"] = runs
    best = {kind: min(r, key=lambda x: x["seconds"]) for kind, r in runs.items()}
    ratios = sorted(lo["seconds"] / sc["seconds"] for sc, lo in zip(runs["scan"], runs["loop"]))
    lines += [
        "",
        f"One selective scan (d_inner {D_INNER}, d_state {D_STATE}), L = {args.loop_len:,}, forward + backward, "
        f"best of {args.repeats} interleaved runs:",
        "",
        "| implementation | forward s | forward + backward s | CPU s | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, name in [("scan", "blocked scan (pathmil)"), ("loop", "plain sequential loop + autograd")]:
        r = best[kind]
        lines.append(
            f"| {name} | {r['forward']:.2f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        f"Speed-up of the scan over the loop (forward + backward): **{best['loop']['seconds'] / best['scan']['seconds']:.1f}x** "
        f"best against best; per interleaved pair {', '.join(f'{x:.1f}x' for x in ratios)}.",
    ]
    if args.tune:
        lines += ["", "Scan block / chunk sizes, L = 4,096, forward + backward:", ""]
        lines += ["| block (tokens) | chunk | seconds |", "|---:|---:|---:|"]
        raw["tune"] = []
        for block, chunk in [(32, 4), (32, 8), (64, 4), (64, 8), (64, 16), (128, 8), (256, 16)]:
            r = run_case(args.threads, "scan", "scan", "4096", str(block), str(chunk))
            raw["tune"].append({"block": block, "chunk": chunk, **r})
            lines.append(f"| {block} | {chunk} | {r['seconds']:.2f} |")
    raw["load_after"] = load()
    lines += ["", f"Load average after: {raw['load_after']}"]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2))
    print(text)


if __name__ == "__main__":
    main()
