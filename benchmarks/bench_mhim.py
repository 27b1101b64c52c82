"""MHIM-MIL cost and benefit: epoch time over the plain student, and test AUC with bootstrap CIs.

1. ``time``: seconds of one training epoch (Trainer.train_epoch, as `pathmil train` runs it) of abmil,
   mhim_abmil, transmil and mhim_transmil on the same synthetic bags (default 200 bags x 2,000 x 1,024),
   each in a fresh subprocess, best of ``--repeats`` epochs; the table gives mhim / plain ratios
   (issue 5's target for mhim_abmil: at most 1.6x).
2. ``auc`` (needs ``--features DIR --cohort CSV``, e.g. the demo cohort's extracted features): for every
   fold, the plain student, then MHIM-MIL with the teacher (and, as the authors' v1 scripts, the student's
   instance embedding) initialised from that fold's plain best.pt; then `pathmil evaluate` on each model's
   folds gives the pooled test AUC with its stratified bootstrap 95 % CI.

3. ``decoys``: the learnable problem of tests/test_mhim.py (the label hangs on a few key instances that
   most bags share with salient decoys), plain ABMIL against MHIM-MIL variants and a control that only
   continues training from the baseline's instance embedding, over several seeds.

Usage:

    python benchmarks/bench_mhim.py time [--bags 200] [--instances 2000] [--repeats 1] [--threads N]
        [--students abmil transmil] [--mhim merge_ratio=0.9 ...]
    python benchmarks/bench_mhim.py auc --features F --cohort C.csv [--splits S.csv | --folds 5]
        [--set epochs=20 ...] [--threads N] [--out benchmarks/out/mhim_auc.md]
    python benchmarks/bench_mhim.py decoys [--seeds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = [("abmil", "mhim_abmil"), ("transmil", "mhim_transmil")]


def machine_line(threads: int | None) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}; "
        f"torch threads {threads or 'default'}; load average {load:.1f}; {time.strftime('%Y-%m-%d')}"
    )


# ------------------------------------------------------------------------------------ epoch time


def make_bags(root: Path, bags: int, instances: int, dim: int = 1024) -> None:
    """Float16 bags as pathmil writes them, labels alternating, one fold that trains on all of them."""
    import numpy as np
    import pandas as pd

    from pathmil.features.bagfile import write_bag

    if (root / "splits.csv").is_file():
        return
    rng = np.random.default_rng(0)
    rows = []
    for i in range(bags):
        x = rng.normal(size=(instances, dim)).astype(np.float16)
        write_bag(root / "features" / f"B{i:03d}.h5", x, np.zeros((instances, 2), np.int64), {}, {})
        rows.append({"slide_id": f"B{i:03d}", "patient_id": f"B{i:03d}", "label": i % 2})
    table = pd.DataFrame(rows)
    table.to_csv(root / "cohort.csv", index=False)
    table[["slide_id", "patient_id"]].assign(fold=0, split="train").to_csv(root / "splits.csv", index=False)


def case_epoch(data_dir: str, aggregator: str, repeats: int, threads: int, mhim: dict) -> dict:
    """Best of ``repeats`` training epochs of ``aggregator`` (run in its own process; threads 0: torch's)."""
    import torch

    from pathmil.tasks import create_task
    from pathmil.training.fit import Trainer, load_fold
    from pathmil.training.run import TrainConfig

    if threads:
        torch.set_num_threads(threads)
    root = Path(data_dir)
    config = TrainConfig(task="classification", aggregator=aggregator, epochs=repeats, bag_level="slide")
    config.mhim = mhim if aggregator.startswith("mhim_") else {}
    task = create_task("classification")
    data = load_fold(config, task, root / "features", root / "cohort.csv", root / "splits.csv", 0)
    trainer = Trainer(config, task, data, root / "run", progress=False)
    times = []
    for epoch in range(repeats):
        start = time.perf_counter()
        trainer.train_epoch(epoch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"aggregator": aggregator, "seconds": min(times), "device": str(trainer.device)}


def run_time(args: argparse.Namespace) -> str:
    data = args.data / f"{args.bags}x{args.instances}"
    make_bags(data, args.bags, args.instances)
    from pathmil.config import parse_overrides

    mhim = json.dumps(parse_overrides(args.mhim))
    pairs = [pair for pair in PAIRS if pair[0] in args.students]
    seconds = {}
    for plain, mhim_name in pairs:
        for name in (plain, mhim_name):
            result = run_case("epoch", str(data), name, str(args.repeats), str(args.threads or 0), mhim)
            seconds[name] = result["seconds"]
            print(f"{name}: {result['seconds']:.2f} s/epoch on {result['device']}", flush=True)
    lines = [
        machine_line(args.threads),
        "",
        f"One training epoch over {args.bags} bags x {args.instances} x 1024 (best of {args.repeats}); "
        f"MHIM-MIL settings: {' '.join(args.mhim) or 'defaults (version 2, merge_ratio 0.8, one recycle token)'}.",
        "",
        "| student | plain s/epoch | MHIM-MIL s/epoch | MHIM / plain |",
        "|---|---:|---:|---:|",
    ]
    for plain, wrapped in pairs:
        ratio = seconds[wrapped] / seconds[plain]
        lines.append(f"| {plain} | {seconds[plain]:.2f} | {seconds[wrapped]:.2f} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- test AUC


THREADS: list[str] = []  # `pathmil --threads N` for every stage the auc mode runs


def pathmil(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pathmil", *THREADS, *args], check=True)


def run_auc(args: argparse.Namespace) -> str:
    out = args.work
    THREADS[:] = ["--threads", str(args.threads)] if args.threads else []
    splits = args.splits
    if splits is None:
        splits = out / "splits.csv"
        pathmil("split", "--cohort", str(args.cohort), "--task", "classification", "--folds", str(args.folds),
                "--out", str(splits))  # fmt: skip
    import pandas as pd

    folds = sorted(pd.read_csv(splits)["fold"].unique())
    overrides = [x for pair in args.overrides for x in ("--set", pair)]
    common = ["--features", str(args.features), "--cohort", str(args.cohort), "--splits", str(splits)]
    common += ["--task", "classification", "--no-progress", *overrides]
    results = {}
    for plain, mhim in PAIRS:
        for fold in folds:
            base_dir = out / plain / f"fold{fold}"
            pathmil("train", *common, "--fold", str(fold), "--aggregator", plain, "--out", str(base_dir))
            teacher = [
                "--set",
                f"mhim.teacher_init={base_dir / 'best.pt'}",
                "--set",
                "mhim.student_init=embed",
            ]
            pathmil("train", *common, "--fold", str(fold), "--aggregator", mhim,
                    "--out", str(out / mhim / f"fold{fold}"), *teacher)  # fmt: skip
        for name in (plain, mhim):
            runs = [str(out / name / f"fold{f}") for f in folds]
            pathmil("evaluate", "--runs", *runs, "--out", str(out / name / "eval"))
            summary = json.loads((out / name / "eval" / "metrics.json").read_text())
            results[name] = next(r for r in summary["summary"] if r["metric"] == "auc")
    lines = [
        machine_line(args.threads),
        "",
        f"Cohort {args.cohort}, features {args.features}, {len(folds)} folds; settings: "
        f"{' '.join(args.overrides) or 'defaults'}. Pooled test AUC with stratified bootstrap 95 % CI, and "
        "the folds' mean +- sd.",
        "",
        "| model | pooled test AUC [95 % CI] | folds mean +- sd |",
        "|---|---:|---:|",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['pooled']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] | "
            f"{row['fold_mean']:.3f} +- {row['fold_std']:.3f} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- decoys

DECOY_VARIANTS = {
    "abmil (plain student)": None,
    "mhim_abmil v2, student from scratch": {"student_init": "none"},
    "mhim_abmil v2, student embedding from baseline": {"student_init": "embed"},
    "mhim_abmil v1, student embedding from baseline": {  # the paper's masks, as in RESULTS.md's table
        "student_init": "embed",
        "version": 1,
        "low_ratio": 0.2,
        "random_ratio": 0.5,
    },
    "control: embedding from baseline, no masks, no consistency": {
        "student_init": "embed",
        "high_ratio": 0.0,
        "merge_ratio": 1.0,
        "consistency_weight": 0.0,
    },
}


def run_decoys(args: argparse.Namespace) -> str:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_mhim import make_decoy_cohort

    from pathmil.training.fit import train
    from pathmil.training.run import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.data / "decoys"
    if not (root / "splits.csv").is_file():
        make_decoy_cohort(root)
    paths = (root / "features", root / "cohort.csv", root / "splits.csv", 0)
    common = {"epochs": 15, "min_epochs": 15, "lr": 1e-3, "bag_level": "slide"}
    common["model"] = {"hidden": 32, "dropout": 0.0}
    aucs: dict[str, list[float]] = {name: [] for name in DECOY_VARIANTS}
    for seed in range(args.seeds):
        baseline = root / f"abmil{seed}"
        for i, (name, mhim) in enumerate(DECOY_VARIANTS.items()):
            if mhim is None:
                config = TrainConfig(aggregator="abmil", seed=seed, **common)
            else:
                mhim = {**mhim, "teacher_init": str(baseline / "best.pt")}
                config = TrainConfig(aggregator="mhim_abmil", mhim=mhim, seed=seed, **common)
            out = baseline if mhim is None else root / f"variant{i}_{seed}"
            summary = train(config, *paths, out, progress=False)
            aucs[name].append(summary["metrics"]["test"]["auc"])
        print(f"seed {seed}: " + ", ".join(f"{v[-1]:.3f}" for v in aucs.values()), flush=True)
    lines = [
        machine_line(args.threads),
        "",
        f"Decoy problem of tests/test_mhim.py (160 bags x 40 x 32; 80 train, 20 val, 60 test), 15 epochs, "
        f"seeds 0-{args.seeds - 1}; MHIM teachers start from the same seed's plain best.pt.",
        "",
        "| model | test AUC mean +- sd | per seed |",
        "|---|---:|---|",
    ]
    for name, values in aucs.items():
        lines.append(
            f"| {name} | {np.mean(values):.3f} +- {np.std(values, ddof=1):.3f} | "
            f"{', '.join(f'{v:.3f}' for v in values)} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- main


def run_case(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"case {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        data, name, repeats, threads, mhim = sys.argv[3:]
        print(json.dumps(case_epoch(data, name, int(repeats), int(threads), json.loads(mhim))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="epoch time of MHIM-MIL over its plain student")
    t.add_argument("--bags", type=int, default=200)
    t.add_argument("--instances", type=int, default=2000)
    t.add_argument("--repeats", type=int, default=1, help="epochs per case; the best counts")
    t.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    t.add_argument("--students", nargs="+", default=["abmil", "transmil"], choices=["abmil", "transmil"])
    t.add_argument("--mhim", action="append", default=[], metavar="KEY=VALUE", help="an MHIM setting")
    t.add_argument("--data", type=Path, default=HERE / "data" / "mhim")
    t.add_argument("--out", type=Path, default=HERE / "out" / "mhim_time.md")
    a = sub.add_parser("auc", help="test AUC of plain vs MHIM-MIL students with bootstrap CIs")
    a.add_argument("--features", type=Path, required=True)
    a.add_argument("--cohort", type=Path, required=True)
    a.add_argument("--splits", type=Path, help="splits CSV (default: made with --folds)")
    a.add_argument("--folds", type=int, default=5)
    a.add_argument("--set", dest="overrides", action="append", default=[], help="training setting KEY=VALUE")
    a.add_argument("--threads", type=int, help="torch threads of each run (default: torch's)")
    a.add_argument("--work", type=Path, default=HERE / "data" / "mhim_auc", help="run folders")
    a.add_argument("--out", type=Path, default=HERE / "out" / "mhim_auc.md")
    d = sub.add_parser("decoys", help="plain vs MHIM-MIL ABMIL on the decoy problem of the tests")
    d.add_argument("--seeds", type=int, default=5)
    d.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    d.add_argument("--data", type=Path, default=HERE / "data" / "mhim")
    d.add_argument("--out", type=Path, default=HERE / "out" / "mhim_decoys.md")
    args = parser.parse_args()
    text = {"time": run_time, "auc": run_auc, "decoys": run_decoys}[args.command](args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
