"""How long the workflow takes to plan a large cohort: `snakemake -n` over N slides (issue 15: a
10,000-slide cohort's dry run in under 60 s).

Makes N empty slide files (a dry run reads names and sizes only) and a cohort table with labels for the
three tasks, then times, in a fresh process each, `snakemake -n -q` (plan only) and `snakemake -n` (plan and
print every job), with the demo's aggregators (abmil, mhim_abmil, mambamil) and 5 folds.

    python benchmarks/bench_dryrun.py --slides 10000          # scratch folder under /tmp
    python benchmarks/bench_dryrun.py --slides 2000 10000 --encoders mobilenet_v2 resnet50_trunc
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_cohort(folder: Path, n_slides: int) -> Path:
    """N empty slide files of N / 2 patients and a cohort table with every task's labels."""
    slides = folder / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    lines = ["slide_id,patient_id,path,label,time,event,stil"]
    for i in range(n_slides):
        path = slides / f"S{i:05d}.svs"
        path.touch()
        p = i // 2  # the patient: two slides each, sharing its labels
        lines.append(f"S{i:05d},P{p:05d},{path},{p % 2},{10 + p % 50},{p % 3 % 2},{p % 90}")
    table = folder / "cohort.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


def time_dry_run(config: Path, workdir: Path, quiet: bool) -> tuple[float, int]:
    """Seconds of one `snakemake -n` (with -q when ``quiet``) and the number of jobs it planned."""
    command = [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile", str(config)]
    command += ["--directory", str(workdir), "--snakefile", str(ROOT / "Snakefile")]
    command += ["-q"] if quiet else []
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{(done.stdout + done.stderr)[-3000:]}")
    total = re.search(r"^total\s+(\d+)", done.stdout + done.stderr, re.M)
    return seconds, int(total.group(1)) if total else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, nargs="+", default=[10000])
    parser.add_argument("--encoders", nargs="+", default=["mobilenet_v2"])
    parser.add_argument(
        "--scratch", type=Path, default=None, help="folder for the cohort (default: a temp dir)"
    )
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="pathmil_dryrun_"))
    print("| slides | encoders | jobs | `snakemake -n -q` s | `snakemake -n` s |")
    print("|---:|---|---:|---:|---:|")
    for n in args.slides:
        folder = scratch / f"n{n}"
        config = {
            "cohort": f"bench{n}",
            "slides": {"table": str(make_cohort(folder, n))},
            "extract": {"encoder": args.encoders if len(args.encoders) > 1 else args.encoders[0]},
            "split": {"folds": 5},
            "tasks": {"classification": None, "survival": None, "regression": None},
            "aggregators": ["abmil", "mhim_abmil", "mambamil"],
        }
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        quiet, _ = time_dry_run(path, folder / "work", quiet=True)
        loud, jobs = time_dry_run(path, folder / "work", quiet=False)
        print(f"| {n:,} | {', '.join(args.encoders)} | {jobs:,} | {quiet:.1f} | {loud:.1f} |", flush=True)


if __name__ == "__main__":
    main()
