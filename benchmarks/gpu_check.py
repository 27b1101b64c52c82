"""The GPU check of issue 17: pathmil's GPU paths, proved in one short lease of a GPU machine.

``scripts/gpu_check.sh`` runs the steps below in this order, each under its own hard time limit, and
this module does the Python part of each (a sub-command per step). Every step drives pathmil's own code:
the ``pathmil`` command (train, predict, tile, extract, split), the workflow, ``extract_slide`` and the
test suite; nothing here re-implements a stage.

- ``info``: the machine, the GPU, and the version of every dependency in pyproject.toml (missing ones
  named).
- ``data``: the demo cohort painted on the machine (zlib TIFFs where imagecodecs is missing), tiled, and
  extracted with the real MobileNetV2 on CUDA; patient-level splits for the three demo tasks.
- ``train``: ABMIL, MHIM-MIL (v2) and MambaMIL for every demo task on fold 0, on CUDA (bf16 autocast) and
  on the CPU with the same seed and bags. Passes when every CUDA run ran on CUDA, each test metric is
  within ``TRAIN_TOLERANCE`` of the CPU run's (dropout and masking draw from another generator on each
  device, so the runs are not bit-equal; where the two kept different epochs, the CUDA run's train
  metric trails the CPU's by at most that, :func:`device_gap`), and the CPU-trained models score the bags on CUDA within
  ``SCORE_TOLERANCE`` of their CPU scores (``pathmil predict --device cuda`` against ``--device cpu``).
- ``extract``: ``resnet50_trunc`` and ``uni`` (ViT-L/16, random weights) on a large slide's worth of
  tiles: the pipeline (``extract_slide``: reader processes, resize, encoder, bag file) against the bare
  encoder on tiles in GPU memory, same settings and batch size (target: at least ``EXTRACT_TARGET``,
  wall clock), with GPU utilisation, at 8 readers and at a reader per core but one; beside the wall
  clock, the rate after the readers' first round (what a slide of tens of thousands of tiles sees); the
  tiles/s of one reading process alone.
- ``workflow``: the Snakemake workflow (local, not SLURM) on a few demo slides with ``extract.gpus: 1``
  and ``train.gpus: 1``; passes when every extraction and training job ran on CUDA.
- ``build``: waits for the background build of mamba-ssm and causal-conv1d, checks they import.
- ``tests``: ``pytest -m gpu`` (mamba-ssm's kernels against the PyTorch scan, forward and backward, fp32
  and bf16).
- ``mamba``: MambaMIL forward + backward (bf16 autocast) at 10k, 50k and 200k instances, mamba-ssm's
  kernels against the PyTorch scan: seconds and peak GPU memory; MambaMIL trained with the kernels.

Each step writes its record to ``WORK/steps/NAME.json`` after every measurement, and ``report`` merges the
records into ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``, so a step killed by its time limit keeps
what it measured. ``--dry-run`` runs the same plumbing on the CPU with tiny sizes (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TRAIN_TOLERANCE = 0.10  # |test metric on CUDA - on CPU| (AUC, c-index, R^2), fold 0 (device_gap)
# max |score on CUDA - on CPU| / range of the CPU scores, same CPU-trained model and bags: float32 on the GPU
# against float64 on the CPU (a CPU-trained model is not scored in bf16; in bf16 it was 0.023, 2026-11-30)
SCORE_TOLERANCE = 1e-3
EXTRACT_TARGET = 0.8  # pipeline tiles/s / bare encoder tiles/s
# a bag size whose forward + backward would take longer than this (linear from the last size) is skipped:
# the PyTorch scan at 200,000 instances (26 s on the H200, 2026-11-30) is measured
MAMBA_SKIP_S = 45
STARTED = time.time()
STEPS = ("info", "data", "train", "extract", "workflow", "build", "tests", "mamba")
# import names of pyproject's dependencies where they differ from the distribution's
IMPORT_NAMES = {
    "openslide-python": "openslide",
    "openslide-bin": "openslide_bin",
    "scikit-survival": "sksurv",
    "scikit-learn": "sklearn",
    "snakemake-executor-plugin-slurm": "snakemake_executor_plugin_slurm",
    "opencv-python-headless": "cv2",
    "pyyaml": "yaml",
}
# dependencies the check does without on the GPU machine, and how
NOT_CARRIED = {"imagecodecs": "slides are written as zlib TIFFs, which tifffile writes without it"}

# sizes of a real run and of the dry run (CPU, tiny)
SIZES = {
    False: {
        "demo": {"n_slides": 24, "n_patients": None, "size": (3072, 3584)},  # 18 patients
        "preset": None,  # config/config.yaml's
        "tasks": None,  # every task of config/config.yaml
        "aggregators": None,  # every aggregator of config/config.yaml
        "epochs": None,  # config/config.yaml's
        "mamba_sizes": [10_000, 50_000, 200_000],
        "mamba_model": {},  # mambamil's defaults (d_model 512, 2 SR-Mamba layers)
        "mamba_in_dim": 1024,
        "encoders": ["resnet50_trunc", "uni"],
        "batch_sizes": [256],  # 64 and 256 gave the same pipeline speed, 2026-11-30
        "readers": [8],  # and a reader per core but one
        "mosaic": 8,  # the H&E region 8 x 8 times: 2,847 tiles
        # the tile list read this many times over (11,388 tiles): each of 15 readers then has about 3
        # batches of 256, not 1, so reading overlaps encoding as on a slide of typical size; with one
        # pass the pipeline waited for all readers' first batches and then encoded them all
        "tile_passes": 4,
        "bare_tiles": 2048,
        "pipeline_repeats": 1,
        "workflow_slides": 10,
        "workflow_tasks": ["classification"],
        "workflow_aggregators": None,
        "workflow_heatmaps": 1,
        "workflow_folds": 2,
        "workflow_epochs": 5,
    },
    True: {
        "demo": {"n_slides": 8, "n_patients": 6, "size": (1536, 1536)},
        "preset": "bwh_biopsy",  # small slides: the tcga preset drops their tissue pieces
        "tasks": ["classification"],
        "aggregators": ["abmil", "mhim_abmil"],  # MambaMIL's plumbing is the mamba step's
        "epochs": 2,
        "mamba_sizes": [256, 512],
        "mamba_model": {"d_model": 32, "d_state": 4, "attn_dim": 16},
        "mamba_in_dim": 64,
        "encoders": ["timm:vit_tiny_patch16_224"],  # the CNN path runs in the data step
        "batch_sizes": [16],
        "readers": [],
        "mosaic": 1,
        "tile_passes": 2,
        "bare_tiles": 32,
        "pipeline_repeats": 1,
        "workflow_slides": 6,
        "workflow_tasks": ["classification"],
        "workflow_aggregators": ["abmil"],
        "workflow_heatmaps": 0,
        "workflow_folds": 2,
        "workflow_epochs": 1,
    },
}


# ------------------------------------------------------------------------------------------ records


class Step:
    """One step's record in ``WORK/steps/NAME.json``, saved (and the report rewritten) after each change."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.path = args.work / "steps" / f"{name}.json"
        self.record: dict[str, Any] = {"name": name, "status": "running", "verdict": "", "results": {}}
        self.save()

    def save(self, **results: Any) -> None:
        self.record["results"].update(results)
        write_json_atomic(self.path, self.record)
        write_report(self.args.work, self.args.out, self.args.dry_run)

    def finish(self, status: str, verdict: str) -> None:
        self.record.update(status=status, verdict=verdict)
        self.save()


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def load_records(work: Path) -> list[dict[str, Any]]:
    records = []
    for name in STEPS:
        path = work / "steps" / f"{name}.json"
        if path.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(path.read_text()))
    return records


def markdown_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if math.isfinite(value) else "n/a"
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def write_report(work: Path, out: Path, dry_run: bool) -> None:
    """``OUT/gpu_check.json`` (every record) and ``OUT/gpu_check.md`` (a table per step)."""
    records = load_records(work)
    machine = next((r["results"].get("machine", {}) for r in records if r["name"] == "info"), {})
    write_json_atomic(out / "gpu_check.json", {"dry_run": dry_run, "machine": machine, "steps": records})
    lines = [f"# pathmil GPU check{' (dry run on the CPU)' if dry_run else ''}", ""]
    if machine:
        lines += [", ".join(f"{k}: {v}" for k, v in machine.items()), ""]
    lines += markdown_table(
        ["step", "status", "seconds", "verdict"],
        [[r["name"], r["status"], r.get("seconds"), r["verdict"]] for r in records],
    )
    for r in records:
        table = r["results"].get("table")
        if table and table["rows"]:
            lines += ["", f"## {r['name']}", "", *markdown_table(table["columns"], table["rows"])]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def finish_step(args: argparse.Namespace) -> None:
    """After a step's process ended: its time, and ``timeout``/``error`` when it did not finish itself."""
    path = args.work / "steps" / f"{args.step}.json"
    record = json.loads(path.read_text()) if path.is_file() else None
    if record is None:
        record = {"name": args.step, "status": "running", "verdict": "", "results": {}}
    if args.status:
        record.update(status=args.status, verdict=args.verdict or record["verdict"])
    elif args.rc in (124, 137):
        record.update(
            status="timeout", verdict=f"stopped at its {args.limit:.0f} s limit; {record['verdict']}"
        )
    elif record["status"] == "running":
        record.update(status="error", verdict=f"exit code {args.rc}; see gpu_check.log")
    if args.results:
        record["results"].update(json.loads(args.results))
    record["seconds"] = round(args.seconds, 1)
    write_json_atomic(path, record)
    write_report(args.work, args.out, args.dry_run)
    print(f"[gpu-check] {args.step}: {record['status'].upper()} in {args.seconds:.0f} s: {record['verdict']}")


# ---------------------------------------------------------------------------------------- helpers


def seconds_left(margin: float = 15.0) -> float | None:
    """Seconds this step may still give a subprocess: its limit (GPU_CHECK_STEP_LIMIT_S, set by
    gpu_check.sh) since this process started, less ``margin`` to record what it did; None without one."""
    limit = os.environ.get("GPU_CHECK_STEP_LIMIT_S")
    if not limit:
        return None
    return max(1.0, float(limit) - (time.time() - STARTED) - margin)


def run(cmd: list[str], log: Path, timeout: float | None = None, env: dict | None = None) -> int:
    """A command with its output in ``log``; returns its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        try:
            return subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[gpu-check] killed after {timeout} s\n")
            return 124


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def pathmil_cmd(*args: str, threads: int | None = None) -> list[str]:
    """``python -m pathmil`` of this interpreter (the console script is not on PATH with --target installs)."""
    return [sys.executable, "-m", "pathmil", *(["--threads", str(threads)] if threads else []), *args]


def demo_config() -> dict[str, Any]:
    """config/config.yaml over pathmil's declared defaults: every section, as the workflow sees it."""
    import yaml

    from pathmil.config import deep_merge, defaults_yaml

    defaults = yaml.safe_load(defaults_yaml())
    return deep_merge(defaults, yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))


def accelerator(dry_run: bool) -> str:
    """``cuda``, or ``cpu`` in a dry run (the same plumbing on the CPU)."""
    return "cpu" if dry_run else "cuda"


def n_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def slide_compression() -> str:
    """jpeg as the demo writes it where imagecodecs is installed, else zlib (tifffile's own codec)."""
    try:
        importlib.import_module("imagecodecs")
    except ImportError:
        return "zlib"
    return "jpeg"


# ------------------------------------------------------------------------------------------- info


def step_info(args: argparse.Namespace) -> None:
    step = Step("info", args)
    import torch

    machine = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": n_cpus(),
        "cpu": cpu_model(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "driver": nvidia_smi("driver_version"),
        }
    step.save(machine=machine)
    versions, missing = dependency_versions()
    nvcc = shutil.which("nvcc")
    step.save(versions=versions, missing=missing, nvcc=nvcc)
    cuda_ok = torch.cuda.is_available() or args.dry_run
    status = "pass" if cuda_ok and not missing else "fail"
    gpu = machine.get("gpu", "no GPU")
    verdict = f"{gpu}, torch {torch.__version__}, Python {machine['python']}"
    verdict += f"; missing: {', '.join(missing)}" if missing else "; every dependency imports"
    absent = [f"{name} absent ({how})" for name, how in NOT_CARRIED.items() if versions.get(name) is None]
    verdict += "".join(f"; {a}" for a in absent)
    step.finish(status, verdict)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def dependency_versions() -> tuple[dict[str, str | None], list[str]]:
    """Version of every dependency in pyproject.toml (plus the optional kernels), and those that fail to import."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0] for d in project["dependencies"]]
    optional = ["mamba-ssm", "causal-conv1d", "pydantic"]
    versions: dict[str, str | None] = {}
    missing = []
    for name in names + optional:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
        if name in names and name not in NOT_CARRIED:
            try:
                importlib.import_module(IMPORT_NAMES.get(name, name.replace("-", "_")))
            except Exception as err:  # an import can fail in any way
                missing.append(f"{name} ({type(err).__name__}: {err})"[:200])
    return versions, missing


# ------------------------------------------------------------------------------------------- data


def data_paths(work: Path) -> dict[str, Path]:
    data = work / "data"
    return {
        "demo": data / "demo",
        "cohort": data / "demo" / "cohort.csv",
        "tiles": data / "tiles",
        "features": data / "features" / "mobilenet_v2",
        "splits": data / "splits",
        "logs": data / "logs",
    }


def step_data(args: argparse.Namespace) -> None:
    """The demo cohort, tiled and extracted with the real MobileNetV2 on CUDA; splits per task."""
    from pathmil.demo import make_demo_cohort

    step = Step("data", args)
    sizes, config, paths = SIZES[args.dry_run], demo_config(), data_paths(args.work)
    compression = "zlib" if args.dry_run else slide_compression()
    start = time.perf_counter()
    table = make_demo_cohort(
        paths["demo"],
        n_slides=sizes["demo"]["n_slides"],
        n_patients=sizes["demo"]["n_patients"],
        size_px=sizes["demo"]["size"],
        seed=config["slides"]["demo"]["seed"],
        progress=False,
        workers=min(n_cpus(), 16),
        compression=compression,
    )
    step.save(slides=len(table), compression=compression, paint_s=round(time.perf_counter() - start, 1))
    n_tiles = tile_cohort(paths, config, args)
    step.save(tiles=n_tiles, tile_s=round(time.perf_counter() - start, 1))
    facts = extract_cohort(paths, config, args, step)
    # training needs splits of slides that have bags: after a partial extraction, of those alone
    with_bags = {f.get("slide_id") for f in facts if f.get("status", "ok") == "ok"}
    if len(with_bags) < len(table):
        table.to_csv(paths["cohort"].with_name("cohort_all.csv"), index=False)
        table[table["slide_id"].astype(str).isin(with_bags)].to_csv(paths["cohort"], index=False)
    for task, spec in tasks_of(config, args.dry_run).items():
        cmd = pathmil_cmd("split", "--cohort", str(paths["cohort"]), "--task", task)
        cmd += ["--target", *spec["target"], "--out", str(paths["splits"] / f"{task}.csv")]
        cmd += ["--folds", str(config["split"]["folds"]), "--val-frac", str(config["split"]["val_frac"])]
        cmd += ["--seed", str(config["split"]["seed"])]
        if run(cmd, paths["logs"] / f"split_{task}.log") != 0:
            step.finish("error", f"pathmil split failed: {tail(paths['logs'] / f'split_{task}.log', 3)}")
            return
    if len(facts) < len(table):
        results = step.record["results"]
        status = "timeout" if results.get("extract_timed_out") else "fail"
        verdict = f"{len(facts)} of {len(table)} slides extracted (later steps use those); "
        step.finish(status, verdict + extract_diagnosis(results))
        return
    devices = sorted({f.get("device", "?") for f in facts})
    on_device = all(f.get("device", "").startswith(accelerator(args.dry_run)) for f in facts)
    speed = sum(f.get("n_tiles", 0) for f in facts) / max(sum(f.get("seconds_total", 0) for f in facts), 1e-9)
    step.save(extract_devices=devices, extract_tiles_per_s=round(speed, 1))
    precisions = sorted({str(f.get("precision")) for f in facts})
    verdict = (
        f"{len(table)} slides ({compression}), {n_tiles} tiles, extracted on {', '.join(devices)} "
        f"({', '.join(precisions)}) at {speed:.0f} tiles/s (mobilenet_v2; the facts' loops, all slides); "
        + extract_diagnosis(step.record["results"])
    )
    step.finish("pass" if on_device and len(facts) == len(table) else "fail", verdict)


def tile_cohort(paths: dict[str, Path], config: dict[str, Any], args: argparse.Namespace) -> int:
    """`pathmil tile` over the cohort, in several processes (one share of the table each)."""
    import pandas as pd

    table = pd.read_csv(paths["cohort"])
    shares = max(1, min(8, n_cpus() // 2, len(table)))
    tile = config["tile"] | (
        {"preset": SIZES[args.dry_run]["preset"]} if SIZES[args.dry_run]["preset"] else {}
    )
    settings = ["--target-mpp", str(tile["target_mpp"]), "--tile-px", str(tile["tile_px"])]
    settings += ["--min-tissue", str(tile["min_tissue"]), "--preset", tile["preset"]]

    def tile_share(i: int) -> int:
        part = paths["demo"] / f"cohort_part{i}.csv"
        table.iloc[i::shares].to_csv(part, index=False)
        cmd = pathmil_cmd("tile", "--cohort", str(part), "--out-dir", str(paths["tiles"]), threads=2)
        cmd += ["--skip-errors", "--failures", str(paths["tiles"] / f"failures_{i}.csv"), *settings]
        return run(cmd, paths["logs"] / f"tile_{i}.log")

    with ThreadPoolExecutor(shares) as pool:
        codes = list(pool.map(tile_share, range(shares)))
    if any(codes):
        raise RuntimeError(
            f"pathmil tile failed: {tail(paths['logs'] / f'tile_{codes.index(max(codes))}.log', 5)}"
        )
    counts = [json.loads(p.read_text()).get("n_tiles", 0) for p in paths["tiles"].glob("*.json")]
    return int(sum(counts))


def extract_cohort(
    paths: dict[str, Path], config: dict[str, Any], args: argparse.Namespace, step: Step
) -> list[dict[str, Any]]:
    """`pathmil extract` over the cohort on the accelerator (the CPU if that fails, so training has bags)."""
    weights = ROOT / config["extract"]["weights"]
    weights_args = ["--weights", str(weights)] if weights.is_file() else ["--random-init"]
    step.save(extract_weights="real" if weights.is_file() else f"random ({weights} not carried)")
    for device in dict.fromkeys([accelerator(args.dry_run), "cpu"]):
        cmd = pathmil_cmd("extract", "--cohort", str(paths["cohort"]), "--tiles-dir", str(paths["tiles"]))
        cmd += ["--out-dir", str(paths["features"]), "--encoder", config["extract"]["encoder"], *weights_args]
        cmd += ["--batch-size", str(config["extract"]["batch_size"]), "--device", device, "--skip-errors"]
        log = paths["logs"] / f"extract_{device}.log"
        start = time.perf_counter()
        code = run(cmd, log, timeout=seconds_left(margin=30))  # 30 s: splits and the record
        step.save(extract_wall_s=round(time.perf_counter() - start, 1), extract_log=tail(log, 6))
        if code == 0:
            break
        step.save(extract_error={device: tail(log, 8)}, extract_timed_out=code == 124)
        if code == 124:  # no time for the CPU
            break
    facts = []
    for path in sorted(paths["features"].glob("*.json"), key=lambda p: p.stat().st_mtime):  # as extracted
        fact = json.loads(path.read_text())
        fact["seconds_total"] = (fact.get("seconds") or {}).get("total", 0)
        facts.append(fact)
    step.save(extract_per_slide=per_slide_seconds(facts))
    return facts


def per_slide_seconds(facts: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a cohort's extraction time went, per slide: the facts' phases (the tile loop's total, its
    wait for tiles and its encoding; with the bag's writing: all) and the readers each slide used."""
    if not facts:
        return {"slides": 0}
    phases: dict[str, float] = {}
    for fact in facts:
        for phase, value in (fact.get("seconds") or {}).items():
            phases[phase] = phases.get(phase, 0.0) + float(value or 0)
    mean = {k: round(v / len(facts), 3) for k, v in phases.items()}
    tiles = sum(f.get("n_tiles", 0) for f in facts) / len(facts)
    # the first slide also pays the CUDA warm-up (context, cuDNN, kernels loaded on first use), which a
    # mean spreads over all: the encoding of each slide in order shows it apart
    encode = [round(float((f.get("seconds") or {}).get("encode", 0.0)), 3) for f in facts]
    return {
        "slides": len(facts),
        "tiles": round(tiles, 1),
        "mean_s": mean,
        "encode_s_in_order": encode,
        "readers": sorted({f.get("workers") for f in facts}, key=str),
    }


def extract_diagnosis(results: dict[str, Any]) -> str:
    """One line on where a cohort extraction's time went: inside the slides' tile loops, or between them."""
    per = results.get("extract_per_slide") or {}
    wall = results.get("extract_wall_s")
    if not per.get("slides") or not wall:
        return f"no slide finished in {wall} s; log: {results.get('extract_log', '')[-300:]}"
    inside = per["mean_s"].get("all", per["mean_s"].get("total", 0)) * per["slides"]
    return (
        f"{per['slides']} slides in {wall:.0f} s, {inside:.0f} s of it inside extract_slide "
        f"(per slide: {per['mean_s']}, {per['tiles']} tiles, readers {per['readers']})"
    )


def have_data(step: Step, args: argparse.Namespace) -> bool:
    """Whether the data step's bags are there; else the step ends as skipped, saying so."""
    paths = data_paths(args.work)
    if paths["cohort"].is_file() and any(paths["features"].glob("*.h5")):
        return True
    step.finish("skipped", "needs the data step's slides and bags (run it too: --only data,...)")
    return False


def tasks_of(config: dict[str, Any], dry_run: bool) -> dict[str, dict[str, Any]]:
    chosen = SIZES[dry_run]["tasks"]
    return {t: spec for t, spec in config["tasks"].items() if chosen is None or t in chosen}


# ------------------------------------------------------------------------------------------ train


def train_settings(config: dict[str, Any], task: str, aggregator: str, dry_run: bool) -> dict[str, Any]:
    """The demo's settings of one run, merged as the workflow merges them (train, task, aggregator)."""
    settings = {k: v for k, v in (config.get("train") or {}).items() if k != "gpus"}
    task_config = config["tasks"][task] or {}
    settings.update(task_config.get("train") or {})
    if task_config.get("task_options"):
        settings["task_options"] = task_config["task_options"]
    for key, value in ((config.get("models") or {}).get(aggregator) or {}).items():
        settings[key] = dict(value) if isinstance(value, dict) else value
    if SIZES[dry_run]["epochs"]:
        settings |= {"epochs": SIZES[dry_run]["epochs"], "min_epochs": 1}
    return settings


def train_run(
    args: argparse.Namespace,
    task: str,
    aggregator: str,
    device: str,
    label: str,
    extra: dict[str, Any] | None = None,
    threads: int = 1,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One `pathmil train` on fold 0, stopped after ``timeout`` s; returns its metrics.json (or the error)."""
    import yaml

    config, paths = demo_config(), data_paths(args.work)
    run_dir = args.work / "train" / task / aggregator / label
    settings = train_settings(config, task, aggregator, args.dry_run) | (extra or {})
    settings["device"] = device
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"train": settings}))
    cli = ["train", "--features", str(paths["features"]), "--cohort", str(paths["cohort"])]
    cli += ["--splits", str(paths["splits"] / f"{task}.csv"), "--fold", "0", "--task", task]
    cli += ["--target", *config["tasks"][task]["target"], "--aggregator", aggregator, "--out", str(run_dir)]
    cli += ["--no-progress", "--config", str(run_dir / "run.yaml")]
    log = run_dir / "train.log"
    if run(pathmil_cmd(*cli, threads=threads), log, timeout=timeout) != 0:
        return {"error": tail(log, 6), "run": str(run_dir)}
    return json.loads((run_dir / "metrics.json").read_text()) | {"run": str(run_dir)}


def test_metric(metrics: dict[str, Any], split: str = "test") -> float:
    if "error" in metrics:
        return math.nan
    return float(metrics["metrics"].get(split, {}).get(metrics["main_metric"], math.nan))


def device_gap(cpu: dict[str, Any], gpu: dict[str, Any]) -> tuple[float, str]:
    """How far the CUDA run is from the CPU run: |test metric difference| where both kept the same epoch.
    Where they kept different epochs (on the demo's 3 validation bags the validation metric ties at 1.0
    over many epochs, and bf16 ties of scores break those ties otherwise), the test metrics compare two
    different models, so the CUDA run is judged by how much its train-split metric trails the CPU's."""
    if cpu.get("best_epoch") == gpu.get("best_epoch"):
        return abs(test_metric(gpu) - test_metric(cpu)), "test"
    return max(0.0, test_metric(cpu, "train") - test_metric(gpu, "train")), "train"


def step_train(args: argparse.Namespace) -> None:
    """Every demo task x aggregator on fold 0: CUDA (bf16 autocast) against the CPU."""
    from pathmil.models.registry import baselines

    step = Step("train", args)
    if not have_data(step, args):
        return
    config = demo_config()
    gpu = accelerator(args.dry_run)
    tasks = list(tasks_of(config, args.dry_run))
    aggregators = SIZES[args.dry_run]["aggregators"] or list(config["aggregators"])
    wrapped = baselines()  # wrapper -> the plain model it starts from
    plain = [a for a in aggregators if a not in wrapped]
    runs: dict[tuple[str, str, str], dict[str, Any]] = {}
    cpu_threads = max(1, n_cpus() // max(1, len(tasks) * len(plain)))

    def one(key: tuple[str, str, str]) -> None:
        task, aggregator, label = key
        extra = {}
        student = wrapped.get(aggregator)
        if student:  # MHIM-MIL: the teacher starts from the plain student trained on the same device
            baseline = runs.get((task, student, label), {})
            if "run" not in baseline or "error" in baseline:
                runs[key] = {"error": f"no {student} run to start the MHIM teacher from"}
                return
            extra = {
                "mhim": {
                    **config["models"].get(aggregator, {}).get("mhim", {}),
                    "teacher_init": str(Path(baseline["run"]) / "best.pt"),
                }
            }
        device = "cpu" if label == "cpu" else gpu
        runs[key] = train_run(
            args, task, aggregator, device, label, extra, cpu_threads if label == "cpu" else 1
        )
        step.save(table=train_table(runs, tasks, aggregators))

    waves = [plain, [a for a in aggregators if a in wrapped]]
    for wave in waves:
        keys = [(t, a, label) for t in tasks for a in wave for label in ("cpu", "gpu")]
        with ThreadPoolExecutor(max(1, len(keys))) as pool:
            list(pool.map(one, keys))
    scores = score_check(args, runs, tasks, aggregators)
    step.save(
        table=train_table(runs, tasks, aggregators, scores), runs={"/".join(k): v for k, v in runs.items()}
    )
    step.finish(*train_verdict(runs, scores, gpu))


def train_table(
    runs: dict[tuple[str, str, str], dict[str, Any]],
    tasks: list[str],
    aggregators: list[str],
    scores: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    rows = []
    for task in tasks:
        for aggregator in aggregators:
            cpu, gpu = runs.get((task, aggregator, "cpu"), {}), runs.get((task, aggregator, "gpu"), {})
            score = (scores or {}).get((task, aggregator), {})
            rows.append(
                [
                    task,
                    aggregator,
                    (cpu or gpu).get("main_metric"),
                    test_metric(cpu) if cpu else None,
                    test_metric(gpu) if gpu else None,
                    abs(test_metric(gpu) - test_metric(cpu)) if cpu and gpu else None,
                    f"{cpu.get('best_epoch', '')}/{gpu.get('best_epoch', '')}",
                    device_gap(cpu, gpu)[0] if cpu and gpu else None,
                    cpu.get("seconds"),
                    gpu.get("seconds"),
                    gpu.get("device") or gpu.get("error", "")[-80:],
                    score.get("max_diff_over_range"),
                ]
            )
    columns = [
        "task",
        "aggregator",
        "test metric",
        "CPU",
        "CUDA",
        "|diff|",
        "best epoch CPU/CUDA",
        "judged gap",
        "CPU s",
        "CUDA s",
        "CUDA run's device",
    ]
    return {"columns": [*columns, "scores CUDA vs CPU: max |diff| / range"], "rows": rows}


def score_check(
    args: argparse.Namespace,
    runs: dict[tuple[str, str, str], dict[str, Any]],
    tasks: list[str],
    aggregators: list[str],
) -> dict[tuple[str, str], dict[str, Any]]:
    """Each CPU-trained model scores every bag on the accelerator and on the CPU (`pathmil predict`)."""
    import pandas as pd

    paths = data_paths(args.work)
    gpu = accelerator(args.dry_run)
    keys = [(t, a) for t in tasks for a in aggregators if "run" in runs.get((t, a, "cpu"), {})]
    keys = [k for k in keys if "error" not in runs[(*k, "cpu")]]

    def predict(key: tuple[str, str], device: str) -> pd.DataFrame | str:
        run_dir = Path(runs[(*key, "cpu")]["run"])
        out = run_dir / f"scores_{device}.csv"
        cmd = pathmil_cmd("predict", "--model", str(run_dir / "best.pt"), "--cohort", str(paths["cohort"]))
        cmd += ["--features-dir", str(paths["features"]), "--device", device, "--out", str(out)]
        if run(cmd, run_dir / f"predict_{device}.log") != 0:
            return tail(run_dir / f"predict_{device}.log", 4)
        return pd.read_csv(out)

    jobs = [(k, d) for k in keys for d in ("cpu", gpu)]
    with ThreadPoolExecutor(max(1, len(jobs))) as pool:
        tables = dict(zip(jobs, pool.map(lambda job: predict(*job), jobs)))
    result = {}
    for key in keys:
        cpu, acc = tables[(key, "cpu")], tables[(key, gpu)]
        if isinstance(cpu, str) or isinstance(acc, str):
            result[key] = {"error": cpu if isinstance(cpu, str) else acc}
            continue
        diff = (acc["score"] - cpu["score"]).abs().max()
        spread = cpu["score"].max() - cpu["score"].min()
        result[key] = {"max_diff": float(diff), "max_diff_over_range": float(diff / max(spread, 1e-6))}
    return result


def train_verdict(
    runs: dict[tuple[str, str, str], dict[str, Any]],
    scores: dict[tuple[str, str], dict[str, Any]],
    gpu: str,
) -> tuple[str, str]:
    pairs = {k[:2] for k in runs}
    errors = [
        f"{'/'.join(k)}: {v['error'].splitlines()[-1] if v['error'] else '?'}"
        for k, v in runs.items()
        if "error" in v
    ]
    off_device = [k for k in pairs if not str(runs.get((*k, "gpu"), {}).get("device", "")).startswith(gpu)]
    gaps = {
        k: device_gap(runs[(*k, "cpu")], runs[(*k, "gpu")])
        for k in sorted(pairs)
        if (*k, "gpu") in runs and (*k, "cpu") in runs
    }
    diffs = [gap for gap, _ in gaps.values()]
    by_train = [f"{'/'.join(k)}" for k, (_, split) in gaps.items() if split == "train"]
    worst = max((d for d in diffs if math.isfinite(d)), default=math.nan)
    score_worst = max((s.get("max_diff_over_range", math.inf) for s in scores.values()), default=math.nan)
    ok = (
        not errors
        and not off_device
        and all(math.isfinite(d) and d <= TRAIN_TOLERANCE for d in diffs)
        and len(scores) == len(pairs)
        and score_worst <= SCORE_TOLERANCE
    )
    verdict = (
        f"{len(pairs)} task x aggregator pairs on {gpu} and cpu; worst gap {worst:.3f} (tolerance "
        f"{TRAIN_TOLERANCE}; |test metric diff| where both kept the same epoch, else how far CUDA's train "
        f"metric trails: {len(by_train)} pairs); worst score diff {score_worst:.2g} of the range (tolerance {SCORE_TOLERANCE})"
    )
    if errors:
        verdict += f"; {len(errors)} run(s) failed, first: {errors[0][:200]}"
    if off_device:
        verdict += f"; not on {gpu}: {', '.join('/'.join(k) for k in sorted(off_device))}"
    return ("pass" if ok else "fail"), verdict


# ------------------------------------------------------------------------------------------ tests


def step_tests(args: argparse.Namespace) -> None:
    """``pytest -m gpu`` over the test suite (mamba-ssm's kernels against the PyTorch scan)."""
    import xml.etree.ElementTree as ET

    step = Step("tests", args)
    report = args.work / "gpu_tests.xml"
    log = args.work / "logs" / "gpu_tests.log"
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    code = run([*cmd, "--junitxml", str(report), "-rs"], log)
    if not report.is_file():
        step.finish("error", f"pytest exit code {code}: {tail(log, 4)}")
        return
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        message = next((c.get("message", "") for c in case if c.tag != "system-out"), "")
        cases.append([case.get("name"), outcome, float(case.get("time", 0)), message[:300]])
    step.save(table={"columns": ["test", "outcome", "seconds", "message"], "rows": cases}, log=tail(log, 30))
    counts = {o: sum(c[1] == o for c in cases) for o in ("passed", "failure", "error", "skipped")}
    verdict = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no GPU test collected"
    if counts["failure"] or counts["error"] or code not in (0, 5):
        status = "fail"
    elif counts["passed"]:
        status = "pass"
    else:
        status = "skipped"
        verdict += f" ({cases[0][3]})" if cases else ""
    step.finish(status, verdict)


# ------------------------------------------------------------------------------------------ mamba


def step_mamba(args: argparse.Namespace) -> None:
    """MambaMIL forward + backward per bag size, kernels against the PyTorch scan; then MambaMIL trained
    with mamba-ssm's kernels in the time the step has left."""
    import torch

    from pathmil.models.ssm import cuda

    step = Step("mamba", args)
    sizes = SIZES[args.dry_run]
    device = torch.device(accelerator(args.dry_run))
    kernels = device.type == "cuda" and cuda.scan_available()
    versions = {n: _version(n) for n in ("mamba-ssm", "causal-conv1d")}
    step.save(kernels=kernels, conv_kernel=cuda.conv_available(), versions=versions)
    columns = ["instances", "backend", "fwd+bwd s", "peak GiB", "note"]
    rows: list[list[Any]] = []
    for backend in ["cuda", "torch"] if kernels else ["torch"]:
        model = mamba_model(backend, device, sizes)
        try:
            time_mamba(model, min(1000, sizes["mamba_sizes"][0]), device, sizes["mamba_in_dim"])  # warm-up
        except Exception as err:  # one backend failing must not hide the other
            rows.append([None, backend, None, None, f"{type(err).__name__}: {err}"[:200]])
            step.save(table={"columns": columns, "rows": rows})
            continue
        last: tuple[int, float] | None = None
        for n in sizes["mamba_sizes"]:
            if last and last[1] * n / last[0] > MAMBA_SKIP_S:
                rows.append(
                    [n, backend, None, None, f"skipped: about {last[1] * n / last[0]:.0f} s expected"]
                )
                continue
            try:
                result = time_mamba(model, n, device, sizes["mamba_in_dim"])
            except Exception as err:
                result = {"error": f"{type(err).__name__}: {err}"[:200]}
            rows.append([n, backend, result.get("seconds"), result.get("peak_gib"), result.get("error", "")])
            last = (n, result["seconds"]) if "seconds" in result else None
            step.save(table={"columns": columns, "rows": rows})
        del model
    trained = train_with_kernels(args) if kernels and data_paths(args.work)["cohort"].is_file() else {}
    step.save(trained_with_kernels=trained)
    step.finish(*mamba_verdict(rows, kernels, trained, device))


def train_with_kernels(args: argparse.Namespace) -> dict[str, Any]:
    """MambaMIL on classification fold 0 with the kernels, against the train step's CPU run."""
    run_ = train_run(args, "classification", "mambamil", "cuda", "gpu_kernels", timeout=seconds_left())
    cpu_metrics = args.work / "train" / "classification" / "mambamil" / "cpu" / "metrics.json"
    cpu = json.loads(cpu_metrics.read_text()) if cpu_metrics.is_file() else {}
    return {
        "kernels": test_metric(run_),
        "cpu": test_metric(cpu) if cpu else None,
        "seconds": run_.get("seconds"),
        "error": run_.get("error"),
    }


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def mamba_model(backend: str, device: Any, sizes: dict[str, Any]) -> Any:
    """MambaMIL with its defaults (the dry run's small sizes) running the scan on ``backend``."""
    import torch

    from pathmil.models import create_model

    torch.manual_seed(0)
    model = create_model("mambamil", in_dim=sizes["mamba_in_dim"], n_outputs=2, **sizes["mamba_model"])
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    return model.to(device)


def time_mamba(model: Any, n: int, device: Any, in_dim: int) -> dict[str, Any]:
    """Seconds and peak GPU memory of one forward + backward (bf16 autocast on CUDA) on a bag of ``n``."""
    import torch

    x = torch.randn(1, n, in_dim, device=device)
    target = torch.tensor([1], device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).logits
        torch.nn.functional.cross_entropy(logits.float(), target).backward()
        sync(device)
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError as err:
        return {"error": f"out of memory: {str(err)[:120]}"}
    finally:
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"seconds": round(seconds, 3), "peak_gib": round(peak, 2) if peak is not None else None}


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def mamba_verdict(
    rows: list[list[Any]], kernels: bool, trained: dict[str, Any], device: Any
) -> tuple[str, str]:
    timed = [r for r in rows if r[2] is not None]
    errors = [r for r in rows if r[4] and not str(r[4]).startswith("skipped")]
    parts = [f"{r[1]} {r[0]:,}: {r[2]:.2f} s, {r[3] if r[3] is not None else '-'} GiB" for r in timed]
    verdict = "; ".join(parts)
    if not kernels:
        verdict = f"mamba-ssm kernels not importable on {device}: PyTorch scan only; " + verdict
    if trained:
        got, cpu = trained.get("kernels"), trained.get("cpu")
        verdict += (
            f"; mambamil trained with the kernels: test {got if got is None else round(got, 3)} vs CPU {cpu}"
        )
        verdict += f" ({trained['error']})" if trained.get("error") else ""
    trained_ok = not trained or (
        None not in (trained.get("cpu"), trained.get("kernels"))
        and abs(trained["kernels"] - trained["cpu"]) <= TRAIN_TOLERANCE
    )
    if errors:
        verdict += f"; {errors[0][1]} failed: {errors[0][4]}"
    if errors or not timed or not trained_ok:
        return "fail", verdict
    return ("pass" if kernels or device.type == "cpu" else "fail"), verdict


# ---------------------------------------------------------------------------------------- extract


EXTRACT_COLUMNS = [
    "encoder",
    "batch",
    "precision",
    "readers",
    "bare tiles/s",
    "pipeline tiles/s (wall)",
    "pipeline / bare",
    "pipeline loop tiles/s (facts)",
    "loop / bare",
    "first round s",
    "after it tiles/s",
    "after it / bare",
    "GPU util % (bare)",
    "GPU util % (pipeline)",
    "loop waited for tiles",
    "error",
]


def step_extract(args: argparse.Namespace) -> None:
    """Pipeline against bare encoder on one large slide, per encoder and batch size, with GPU utilisation.

    The pipeline's speed is the slide's tiles over the wall time of ``extract_slide`` (reader start-up and
    bag writing included, as benchmarks/bench_extract.py measures it) and, beside it, the facts' tiles/s
    of its loop alone."""
    from benchmarks.bench_extract import limit_tiles, make_slide, repeat_tiles
    from pathmil.slide.tilefile import read_tiles

    step = Step("extract", args)
    sizes = SIZES[args.dry_run]
    compression = "zlib" if args.dry_run else slide_compression()
    work = args.work / "extract"
    work.mkdir(parents=True, exist_ok=True)
    slide, tiles = make_slide(work, repeat=sizes["mosaic"], compression=compression)
    if args.dry_run:
        tiles = limit_tiles(tiles, 48, work / "tiles_dry.h5")
    tiles = repeat_tiles(tiles, sizes["tile_passes"], work / "tiles_passes.h5")
    n_tiles = len(read_tiles(tiles).coords)
    step.save(slide_tiles=n_tiles, compression=compression)
    try:
        step.save(one_reader_tiles_per_s=one_reader_rate(slide, tiles, sizes["encoders"][0]))
    except Exception as err:  # the pipeline's table matters more than this diagnostic
        step.save(one_reader_tiles_per_s=None, one_reader_error=f"{type(err).__name__}: {err}"[:200])
    # the readers' speed depends on what else runs: the kernels' build (nvcc on every core) may
    step.save(load_average=[round(x, 1) for x in os.getloadavg()], build_running=build_running(args.work))
    rows: list[list[Any]] = []
    images: dict[str, Any] = {}  # the bare encoder's tiles, read once per encoder
    # every encoder and batch size at each number of readers (8, the CPU's default cap, and a reader per
    # core but one, as the default on a GPU up to 16): how far readers scale
    readers = [*sizes["readers"], max(1, n_cpus() - 1)]
    runs = [(e, b, r) for r in readers for e in sizes["encoders"] for b in sizes["batch_sizes"]]
    for encoder, batch, workers in runs:
        try:
            row, images[encoder] = measure_extraction(
                encoder, batch, slide, tiles, images.get(encoder), args, workers
            )
        except Exception as err:  # one failure must not hide the other encoders
            row = {"encoder": encoder, "batch": batch, "error": f"{type(err).__name__}: {err}"[:200]}
        rows.append([row.get(c) for c in EXTRACT_COLUMNS])
        step.save(table={"columns": EXTRACT_COLUMNS, "rows": rows})
    status, verdict = extract_verdict(rows, n_tiles, args.dry_run)
    results = step.record["results"]
    one, building = results["one_reader_tiles_per_s"], results["build_running"]
    verdict += f"; one reader alone: {one} tiles/s; load {results['load_average'][0]}"
    step.finish(status, verdict + (" while the kernels built" if building else ""))


def build_running(work: Path) -> bool:
    """Whether gpu_check.sh's background build of the kernels is still under way."""
    if (work / "build.skip").is_file() or not (work / "logs" / "build.log").is_file():
        return False
    return not all((work / f"build_{name}.rc").is_file() for name in ("conv1d", "mamba"))


def one_reader_rate(slide: Path, tiles: Path, encoder: str, n: int = 256) -> float:
    """Tiles/s of one reading process alone (read, resize, crop; one thread), as each reader does it: the
    readers' ceiling is about this times their number."""
    import cv2
    import torch

    from pathmil.features.encoders import encoder_spec
    from pathmil.features.extract import TileBatches
    from pathmil.slide.tilefile import read_tiles

    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        tileset = read_tiles(tiles)
        dataset = TileBatches(slide, "reader", None, tileset, encoder_spec(encoder).preprocess)
        count = min(n, len(dataset))
        dataset.read(0)  # the handle opened before timing
        start = time.perf_counter()
        for index in range(count):
            dataset.read(index)
        return round(count / (time.perf_counter() - start), 1)
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])


def measure_extraction(
    encoder: str,
    batch: int,
    slide: Path,
    tiles: Path,
    images: Any,
    args: argparse.Namespace,
    workers: int | None = None,
) -> tuple[dict[str, Any], Any]:
    """One encoder at one batch size: the bare encoder on tiles in device memory, then the pipeline with
    ``workers`` readers (None: pathmil's default)."""
    import tempfile

    import torch

    from benchmarks.bench_extract import tiles_in_memory, time_bare
    from pathmil.features.extract import extract_slide

    sizes = SIZES[args.dry_run]
    pipeline = make_extractor(encoder, batch, accelerator(args.dry_run), workers)
    runner = pipeline.runner  # built before timing, as the facts' tiles/s leave model loading out
    if images is None:
        images = tiles_in_memory(slide, tiles, runner.encoder.preprocess, sizes["bare_tiles"])
    x = runner.normalise(images)
    with utilisation(runner.device) as bare_util:
        bare, _ = time_bare(runner, x, batch, max(1, len(x) // batch))
    del x
    walls, loops, waits, steady, firsts = [], [], [], [], []
    with utilisation(runner.device) as pipe_util, tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for repeat in range(sizes["pipeline_repeats"]):
            start = time.perf_counter()
            facts = extract_slide(slide, tiles, Path(tmp) / f"bag{repeat}.h5", pipeline)
            walls.append(facts["n_tiles"] / (time.perf_counter() - start))
            loops.append(facts["tiles_per_second"])
            seconds = facts["seconds"]
            waits.append(seconds["wait_for_tiles"] / max(seconds["total"], 1e-9))
            # after the readers' first round (each delivered one batch): the rate a large slide sees
            firsts.append(seconds["first_round"])
            rest_tiles = facts["n_tiles"] - max(facts["workers"], 1) * batch
            rest_s = seconds["total"] - seconds["first_round"]
            steady.append(rest_tiles / rest_s if rest_tiles > 0 and rest_s > 0 else None)
    best = max(range(len(walls)), key=walls.__getitem__)
    row = {
        "encoder": encoder,
        "batch": batch,
        "precision": runner.precision,
        "readers": facts["workers"],
        "bare tiles/s": round(bare.per_s, 1),
        "pipeline tiles/s (wall)": round(walls[best], 1),
        "pipeline / bare": round(walls[best] / bare.per_s, 3),
        "pipeline loop tiles/s (facts)": round(loops[best], 1),
        "loop / bare": round(loops[best] / bare.per_s, 3),
        "first round s": round(firsts[best], 2),
        "after it tiles/s": None if steady[best] is None else round(steady[best], 1),
        "after it / bare": None if steady[best] is None else round(steady[best] / bare.per_s, 3),
        "GPU util % (bare)": bare_util.get("mean"),
        "GPU util % (pipeline)": pipe_util.get("mean"),
        "loop waited for tiles": f"{waits[best]:.0%}",
    }
    del pipeline, runner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row, images


def make_extractor(encoder: str, batch: int, device: str, workers: int | None = None) -> Any:
    """The pipeline of `pathmil extract` for ``encoder`` on random weights (speed does not depend on them)."""
    from pathmil.features.extract import ExtractConfig, FeatureExtractor

    config = ExtractConfig(
        encoder=encoder, random_init=True, batch_size=batch, device=device, overwrite=True, workers=workers
    )
    return FeatureExtractor(config)


@contextlib.contextmanager
def utilisation(device: Any, every: float = 0.05) -> Iterator[dict[str, float]]:
    """Mean GPU utilisation (NVML's percent of time a kernel ran) while the block runs; empty on the CPU."""
    import torch

    result: dict[str, float] = {}
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):
                samples.append(float(torch.cuda.utilization(device)))

    thread = threading.Thread(target=sample, daemon=True) if device.type == "cuda" else None
    if thread:
        thread.start()
    try:
        yield result
    finally:
        stop.set()
        if thread:
            thread.join()
        if samples:
            result.update(mean=round(sum(samples) / len(samples), 1), n=len(samples))


def extract_verdict(rows: list[list[Any]], n_tiles: int, dry_run: bool) -> tuple[str, str]:
    """Pass when every pipeline ran at ``EXTRACT_TARGET`` of its bare encoder or better, wall clock (not
    judged on a CPU)."""
    done = [
        dict(zip(EXTRACT_COLUMNS, r)) for r in rows if r[EXTRACT_COLUMNS.index("pipeline / bare")] is not None
    ]
    errors = [r[-1] for r in rows if r[EXTRACT_COLUMNS.index("pipeline / bare")] is None]
    parts = [
        f"{r['encoder']} b{r['batch']} r{r['readers']}: {r['pipeline tiles/s (wall)']:.0f}/{r['bare tiles/s']:.0f} tiles/s = "
        f"{r['pipeline / bare']:.2f} (loop {r['loop / bare']:.2f}, after the first round "
        f"{r['after it / bare']}), GPU util {r['GPU util % (pipeline)']}%"
        for r in done
    ]
    verdict = f"{n_tiles} tiles; " + "; ".join(parts)
    if errors:
        return "error" if not done else "fail", verdict + f"; failed: {errors[0]}"
    if dry_run:
        return "pass", verdict + " (speed not judged in a dry run)"
    ok = min(r["pipeline / bare"] for r in done) >= EXTRACT_TARGET
    return ("pass" if ok else "fail"), verdict + f" (target >= {EXTRACT_TARGET})"


# --------------------------------------------------------------------------------------- workflow


def step_workflow(args: argparse.Namespace) -> None:
    """The Snakemake workflow (local) on a few demo slides, with extract.gpus: 1 and train.gpus: 1.

    A dry run asks Snakemake for its plan alone (``-n``: the config validates, every extraction and
    training job asks for one GPU); tests/test_workflow.py runs the workflow itself on the CPU."""
    step = Step("workflow", args)
    if not have_data(step, args):
        return
    where, n_slides = workflow_folder(args)
    cores = n_cpus()
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        str(cores),
        "--resources",
        f"gpu={max(1, cores // 4)}",
    ]
    cmd += ["--configfile", "gpu_check.yaml", "--scheduler", "greedy", "--keep-going", "--nocolor"]
    cmd += ["-n", "--printshellcmds"] if args.dry_run else []
    env = {**os.environ, "PATH": f"{args.work / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    log = args.work / "logs" / "workflow.log"
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=where, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    step.save(seconds_snakemake=round(seconds, 1), log_tail=tail(log, 25))
    head = f"snakemake exit {code} in {seconds:.0f} s on {n_slides} slides"
    if args.dry_run:
        text = log.read_text()
        planned = planned_jobs(text)
        gpu_jobs = {
            rule: len(re.findall(rf"rule {rule}:\n(?:[ \t]+.*\n)*?[ \t]+resources:.*gpu=1", text))
            for rule in ("extract", "train")
        }
        step.save(gpu_jobs=gpu_jobs, planned_jobs=planned)
        ok = (
            code == 0
            and gpu_jobs["extract"] == n_slides
            and gpu_jobs["train"] == planned.get("train", -1) > 0
        )
        step.finish("pass" if ok else "fail", f"{head} (plan only); jobs asking for gpu=1: {gpu_jobs}")
        return
    results = where / "results" / "gpu_check"
    extract_devices = devices_in(results / "features", "*.json")
    train_devices = devices_in(results / "models", "metrics.json")
    summary = results / "report" / "summary.csv"
    step.save(
        extract_devices=extract_devices,
        train_devices=train_devices,
        summary=summary.read_text() if summary.is_file() else None,
    )
    on_gpu = bool(extract_devices) and all(d.startswith("cuda") for d in extract_devices + train_devices)
    ok = code == 0 and summary.is_file() and on_gpu and bool(train_devices)
    verdict = (
        f"{head}; extraction on {', '.join(extract_devices) or '-'}, training on "
        f"{', '.join(train_devices) or '-'}; report {'written' if summary.is_file() else 'missing'}"
    )
    step.finish("pass" if ok else "fail", verdict)


def workflow_folder(args: argparse.Namespace) -> tuple[Path, int]:
    """A copy of the workflow with a config of the first demo slides, GPUs asked for; (folder, slides)."""
    import pandas as pd
    import yaml

    sizes, paths = SIZES[args.dry_run], data_paths(args.work)
    where = args.work / "workflow"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    for name in ["Snakefile", "config", "workflow", "envs"]:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, where / name)
    table = pd.read_csv(paths["cohort"]).head(sizes["workflow_slides"])
    table["path"] = [str((paths["demo"] / p).resolve()) for p in table["path"]]
    table.to_csv(where / "cohort.csv", index=False)
    config = demo_config()
    weights = ROOT / config["extract"]["weights"]
    config["cohort"] = "gpu_check"
    config["slides"] = {"table": str(where / "cohort.csv")}
    config["tasks"] = {t: config["tasks"][t] for t in sizes["workflow_tasks"]}
    config["extract"] |= (
        {"gpus": 1, "weights": str(weights)}
        if weights.is_file()
        else {"gpus": 1, "weights": None, "random_init": True}
    )
    config["train"] |= {"gpus": 1, "epochs": sizes["workflow_epochs"], "min_epochs": 1}
    config["split"]["folds"] = sizes["workflow_folds"]
    config["aggregators"] = sizes["workflow_aggregators"] or config["aggregators"]
    if sizes["preset"]:
        config["tile"]["preset"] = sizes["preset"]
    config["evaluate"]["n_bootstrap"] = 100
    config["report"]["heatmaps"] = sizes["workflow_heatmaps"]
    (where / "gpu_check.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return where, len(table)


def planned_jobs(output: str) -> dict[str, int]:
    """The first "Job stats" table of a snakemake run or plan, as {rule: count}."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("job ") and "count" in line), None)
    counts: dict[str, int] = {}
    for line in lines[start + 2 :] if start is not None else []:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def devices_in(folder: Path, pattern: str) -> list[str]:
    """The devices that facts or metrics files under ``folder`` name (``failed`` for a failed slide)."""
    return sorted({json.loads(p.read_text()).get("device") or "failed" for p in folder.rglob(pattern)})


# ------------------------------------------------------------------------------------------ build

KERNEL_PACKAGES = {"conv1d": "causal-conv1d", "mamba": "mamba-ssm"}
KERNEL_PROBE = (  # torch first: the extensions need the libc10 it loads
    "import torch, causal_conv1d, selective_scan_cuda; "
    "from causal_conv1d import causal_conv1d_fn; "
    "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn"
)


def step_build(args: argparse.Namespace) -> None:
    """How the background build of the kernels ended (scripts/gpu_check.sh), and whether they import."""
    step = Step("build", args)
    skip = args.work / "build.skip"
    if skip.is_file():
        finish_build(args, step, "skipped", skip.read_text().strip())
        return
    builds, failed = {}, []
    for name, package in KERNEL_PACKAGES.items():
        rc_file, log = args.work / f"build_{name}.rc", args.work / "logs" / f"build_{name}.log"
        rc, seconds = [*rc_file.read_text().split(), "?", "?"][:2] if rc_file.is_file() else ("?", "?")
        builds[package] = {"rc": rc, "seconds": seconds}
        if rc != "0":
            builds[package]["log_tail"] = tail(log, 15)
            failed.append(f"{package} {'over its time cap' if rc in ('124', '137') else f'exit {rc}'}")
    step.save(builds=builds)
    if failed:
        status = "timeout" if all("cap" in f for f in failed) else "fail"
        finish_build(args, step, status, "not built: " + ", ".join(failed) + "; tests and mamba run without")
        return
    paths = [str(args.kernels / name) for name in KERNEL_PACKAGES]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), *paths])}
    probe = subprocess.run([sys.executable, "-c", KERNEL_PROBE], capture_output=True, text=True, env=env)
    trimmed = None
    if probe.returncode != 0:  # mamba_ssm/__init__ imports its language models (transformers, ...)
        trimmed = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "?"
        init = args.kernels / "mamba" / "mamba_ssm" / "__init__.py"
        if init.is_file():
            version = re.search(r'__version__ = "([^"]+)"', init.read_text())
            init.write_text(
                f'__version__ = "{version.group(1) if version else "?"}"  # trimmed by gpu_check\n'
            )
            probe = subprocess.run(
                [sys.executable, "-c", KERNEL_PROBE], capture_output=True, text=True, env=env
            )
    step.save(import_error_before_trim=trimmed)
    built = ", ".join(f"{p} {how_built(b['seconds'])}" for p, b in builds.items())
    if probe.returncode != 0:
        finish_build(
            args,
            step,
            "fail",
            f"built ({built}) but the kernels do not import: {probe.stderr.strip()[-300:]}",
        )
        return
    (args.kernels / "imports.ok").write_text(verdict_time())
    verdict = f"built for sm_90: {built}; the kernels import"
    if trimmed:
        verdict += f" after trimming mamba_ssm/__init__.py (it failed with: {trimmed[:150]})"
    finish_build(args, step, "pass", verdict)


def how_built(seconds: str) -> str:
    return "reused from an earlier call" if seconds == "reused" else f"in {seconds} s"


def verdict_time() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def finish_build(args: argparse.Namespace, step: Step, status: str, verdict: str) -> None:
    step.record["seconds"] = round(args.seconds, 1)
    step.finish(status, verdict)
    print(f"[gpu-check] build: {status.upper()} after waiting {args.seconds:.0f} s: {verdict}")


def patch_setup(path: Path, arch: str = "90") -> None:
    """Keep only ``sm_<arch>`` among the ``-gencode`` flags that mamba-ssm's and causal-conv1d's setup.py
    hard-code (sm_75 ... sm_121 with CUDA 13, whatever TORCH_CUDA_ARCH_LIST says): one architecture
    builds in minutes instead of an hour. Each dropped pair becomes ``pass`` (it may be the only statement
    of an ``if``). Raises SystemExit when the file does not look as expected."""
    text = path.read_text()
    pair = re.compile(
        r'(?m)^([ \t]*)cc_flag\.append\("-gencode"\)\n[ \t]*cc_flag\.append\("arch=compute_(\d+a?),code=sm_\d+a?"\)'
    )
    found = [m.group(2) for m in pair.finditer(text)]
    if arch not in found:
        raise SystemExit(
            f"{path}: no -gencode pair for sm_{arch} (found {found}); the check needs a new patch"
        )
    patched = pair.sub(
        lambda m: m.group(0) if m.group(2) == arch else f"{m.group(1)}pass  # gpu_check: no sm_{m.group(2)}",
        text,
    )
    left = re.findall(r'"arch=compute_(\d+a?)', patched)
    if left != [arch]:
        raise SystemExit(f"{path}: after patching, architectures {left} remain")
    compile(patched, str(path), "exec")  # a SyntaxError here, not in pip's build
    path.write_text(patched)
    print(f"{path}: -gencode for sm_{arch} only (dropped {', '.join(f for f in found if f != arch)})")


def fallbacks(folder: Path) -> list[Path]:
    """Wheels of ``folder`` whose requirement in ``folder/SPECS`` the installed version does not meet."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    needed = []
    specs = folder / "SPECS"
    for line in specs.read_text().splitlines() if specs.is_file() else []:
        requirement = Requirement(line)
        installed = _version(requirement.name)
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            name = canonicalize_name(requirement.name)
            needed += [w for w in folder.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) == name]
    return needed


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=[*STEPS, "finish", "patch-setup", "fallbacks"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"), help="scratch folder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the plumbing only")
    parser.add_argument("--step", help="finish: the step that ended")
    parser.add_argument("--rc", type=int, default=0, help="finish: its exit code")
    parser.add_argument("--seconds", type=float, default=0.0, help="finish: its duration")
    parser.add_argument("--limit", type=float, default=0.0, help="finish: its time limit")
    parser.add_argument("--status", help="finish: set the status (steps the shell runs itself)")
    parser.add_argument("--verdict", help="finish: set the verdict")
    parser.add_argument("--results", help="finish: JSON of results to add")
    parser.add_argument("--path", type=Path, help="patch-setup: the setup.py; fallbacks: the folder")
    parser.add_argument("--kernels", type=Path, help="build: where the kernels were installed")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    commands: dict[str, Callable[[argparse.Namespace], None]] = {
        "info": step_info,
        "build": step_build,
        "data": step_data,
        "train": step_train,
        "tests": step_tests,
        "mamba": step_mamba,
        "extract": step_extract,
        "workflow": step_workflow,
        "finish": finish_step,
        "patch-setup": lambda a: patch_setup(a.path),
        "fallbacks": lambda a: print("\n".join(str(w) for w in fallbacks(a.path))),
    }
    try:
        commands[args.command](args)
    except Exception as err:  # the step's record says what broke; the traceback goes to the log
        path = args.work / "steps" / f"{args.command}.json"
        if args.command in STEPS and path.is_file():
            record = json.loads(path.read_text())
            record.update(status="error", verdict=f"{type(err).__name__}: {err}"[:400])
            write_json_atomic(path, record)
            write_report(args.work, args.out, args.dry_run)
        raise


if __name__ == "__main__":
    main()
