"""ABMIL training cost on CPU: seconds per epoch and peak memory.

1. One epoch of `pathmil train`'s loop (Trainer.train_epoch) over 200 bags of 5,000 x 1,024 features.
2. One forward-backward pass on a single bag of 100,000 and of 200,000 instances.

Each case runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own; the baseline of a
process that imported torch and pathmil is reported beside it. Usage:

    python benchmarks/bench_abmil.py [--bags 200] [--instances 5000] [--out benchmarks/out/abmil.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_baseline() -> dict:
    import torch  # noqa: F401

    import pathmil.models  # noqa: F401

    return {"peak_rss_mb": peak_rss_mb()}


def case_single_bag(n: int) -> dict:
    import torch

    from pathmil.models import create_model

    torch.manual_seed(0)
    model = create_model("abmil", in_dim=1024, n_outputs=2)
    x = torch.randn(1, n, 1024)
    target = torch.tensor([1])
    times = []
    for _ in range(3):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x).logits, target)
        loss.backward()
        model.zero_grad()
        times.append(time.perf_counter() - start)
    return {"n": n, "seconds": min(times), "peak_rss_mb": peak_rss_mb(), "input_mb": x.numel() * 4 / 2**20}


def case_epoch(data_dir: str, bags: int, instances: int) -> dict:
    from pathmil.tasks import create_task
    from pathmil.training.fit import Trainer, load_fold
    from pathmil.training.run import TrainConfig

    root = Path(data_dir)
    config = TrainConfig(task="classification", aggregator="abmil", epochs=1)
    task = create_task("classification")
    data = load_fold(config, task, root / "features", root / "cohort.csv", root / "splits.csv", 0)
    trainer = Trainer(config, task, data, root / "run", progress=False)
    start = time.perf_counter()
    trainer.train_epoch(0)
    return {
        "bags": bags,
        "instances": instances,
        "seconds_per_epoch": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "bags_in_memory": data.datasets["train"].cache is not None,
    }


def make_bags(root: Path, bags: int, instances: int) -> None:
    """200 bags of float16 features (as pathmil writes them), a cohort table and a one-fold split."""
    import numpy as np
    import pandas as pd

    from pathmil.features.bagfile import write_bag

    if (root / "splits.csv").is_file():
        return
    rng = np.random.default_rng(0)
    rows = []
    for i in range(bags):
        x = rng.normal(size=(instances, 1024)).astype(np.float16)
        coords = np.zeros((instances, 2), np.int64)
        write_bag(root / "features" / f"B{i:03d}.h5", x, coords, {"patch_size": 256, "patch_level": 0}, {})
        rows.append({"slide_id": f"B{i:03d}", "patient_id": f"B{i:03d}", "label": i % 2})
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    splits = pd.DataFrame(
        {
            "slide_id": [r["slide_id"] for r in rows],
            "patient_id": [r["patient_id"] for r in rows],
            "fold": 0,
            "split": "train",
        }
    )
    splits.to_csv(root / "splits.csv", index=False)


def run_case(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--case", *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 200_000])
    parser.add_argument("--data", type=Path, default=HERE / "data" / "abmil")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "abmil.md")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        name, *rest = args.case
        result = {
            "baseline": case_baseline,
            "bag": lambda: case_single_bag(int(rest[0])),
            "epoch": lambda: case_epoch(rest[0], int(rest[1]), int(rest[2])),
        }[name]()
        print(json.dumps(result))
        return
    make_bags(args.data, args.bags, args.instances)
    baseline = run_case("baseline")
    epoch = run_case("epoch", str(args.data), str(args.bags), str(args.instances))
    singles = [run_case("bag", str(n)) for n in args.sizes]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; "
        f"torch threads default; {time.strftime('%Y-%m-%d')}",
        "",
        f"Baseline process (python + torch + pathmil imported): peak RSS {baseline['peak_rss_mb']:.0f} MB",
        "",
        "| case | seconds | peak RSS (MB) |",
        "|---|---:|---:|",
        f"| ABMIL, one training epoch, {args.bags} bags x {args.instances} x 1024 "
        f"({'in memory' if epoch['bags_in_memory'] else 'from disk'}) | {epoch['seconds_per_epoch']:.1f} | "
        f"{epoch['peak_rss_mb']:.0f} |",
    ]
    lines += [
        f"| ABMIL, forward + backward, one bag of {s['n']:,} x 1024 | {s['seconds']:.2f} | {s['peak_rss_mb']:.0f} |"
        for s in singles
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
