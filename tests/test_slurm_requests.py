"""What the workflow asks SLURM for, checked without a cluster: a stand-in sbatch records every request.

A 120-slide cohort of sparse files (0.1-3 GB, and one of 150 GB whose extraction alone takes most of a
day) runs through the SLURM profile with stand-ins for SLURM's commands (tests/slurm/stand_in.py): sbatch
records its arguments, sacct reports every job as failed, so the profile's retries resubmit each batch twice
and every attempt's request is on record without anything running.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_helpers import ROOT, workflow_copy, write_config

PROFILE = ROOT / "workflow" / "profiles" / "slurm" / "config.yaml"
STAND_IN = ROOT / "tests" / "slurm" / "stand_in.py"
SLURM_COMMANDS = ["sbatch", "sacct", "squeue", "scontrol", "sinfo", "scancel", "sacctmgr"]
MAX_MINUTES = 24 * 60  # slurm.max_runtime's default
MAX_MEM_MB, MAX_CPUS = 32000, 8  # the profile's per-job limits


def option(args: list[str], name: str) -> str | None:
    """The value of ``-t 30`` or ``--gpus=1`` style options in an sbatch call."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def cohort_of_sparse_slides(folder: Path, n: int = 120) -> Path:
    """A cohort table of ``n`` slides: sparse files of 0.1-3 GB, the last one 150 GB (no disk is used)."""
    rng = random.Random(0)
    (folder / "slides").mkdir(parents=True)
    rows = ["slide_id,patient_id,path,label"]
    for i in range(n):
        size = 150_000_000_000 if i == n - 1 else int(rng.uniform(0.1, 3.0) * 1e9)
        path = folder / "slides" / f"S{i:03d}.svs"
        with path.open("wb") as f:
            f.truncate(size)
        rows.append(f"S{i:03d},P{i // 2:03d},{path},{(i // 2) % 2}")
    table = folder / "cohort.csv"
    table.write_text("\n".join(rows) + "\n")
    return table


@pytest.mark.slow
def test_batches_of_a_120_slide_cohort_ask_for_no_more_than_the_cap(tmp_path):
    work = workflow_copy(tmp_path / "w")
    config = {
        "cohort": "big",
        "slides": {"table": str(cohort_of_sparse_slides(tmp_path))},
        "extract": {"encoder": "uni", "gpus": 1, "threads": 8, "workers": 7},
        "tasks": {"classification": {"target": ["label"]}},
        "aggregators": ["abmil"],
        "train": {"gpus": 1},
    }
    configfile = write_config(tmp_path / "big.yaml", config)
    stand_ins, records = tmp_path / "bin", tmp_path / "records"
    stand_ins.mkdir()
    records.mkdir()
    for command in SLURM_COMMANDS:
        (stand_ins / command).symlink_to(STAND_IN)
    env = {**os.environ, "STAND_IN_SLURM": str(records)}
    env["PATH"] = os.pathsep.join([str(stand_ins), str(Path(sys.executable).parent), env["PATH"]])
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(PROFILE.parent), "--configfile", str(configfile),
         "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "1"],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, "the stand-in reports every job failed"
    calls = [json.loads(line) for line in (records / "sbatch.jsonl").read_text().splitlines()]
    assert calls, output[-3000:]

    attempts: dict[str, list[dict]] = {}  # batch -> its submissions, in order
    for call in calls:
        args = call["args"]
        comment = option(args, "--comment")
        batch = re.fullmatch(r"rule_(slides_\d+)_batch_extract_tile", comment)
        assert batch, f"only batches are submitted (all else waits for them): {comment}"
        slides = set(re.findall(r"'(?:tile|extract):slide=(S\d+)'", call["args"][-1] + call["script"]))
        request = {
            "minutes": int(option(args, "-t")),
            "mem_mb": int(option(args, "--mem")),
            "cpus": int(option(args, "--cpus-per-task")),
            "gpus": option(args, "--gpus"),
            "slides": slides,
        }
        attempts.setdefault(batch[1], []).append(request)

    retries = yaml.safe_load(PROFILE.read_text())["retries"]
    summary = []
    for batch, requests in sorted(attempts.items()):
        assert len(requests) == retries + 1  # the first attempt and the profile's retries
        minutes = [r["minutes"] for r in requests]
        size, memory = len(requests[0]["slides"]), requests[0]["mem_mb"]
        summary.append(f"{batch}: {size} slides, -t {minutes}, --mem {memory}")
        if len(requests[0]["slides"]) > 1:  # filled to half the cap: a retry can double
            assert minutes[0] <= MAX_MINUTES // 2, summary[-1]
        assert all(m <= MAX_MINUTES for m in minutes), summary[-1]
        assert minutes == sorted(minutes) and minutes[1] > minutes[0]  # a retry asks for more time
        for request in requests:
            assert request["mem_mb"] <= MAX_MEM_MB and request["cpus"] <= MAX_CPUS
            assert request["gpus"] == "1"  # extraction's GPU, once per batch
            assert request["slides"] == requests[0]["slides"]
    batches = [requests[0]["slides"] for requests in attempts.values()]
    every_slide = [slide for slides in batches for slide in slides]
    assert sorted(every_slide) == [f"S{i:03d}" for i in range(120)]  # each slide in exactly one batch
    huge = next(requests for requests in attempts.values() if "S119" in requests[0]["slides"])
    assert huge[0]["slides"] == {"S119"}  # the 150 GB slide fills a batch alone, capped on its retries
    assert huge[0]["minutes"] > MAX_MINUTES // 2 and huge[1]["minutes"] == MAX_MINUTES - 1
    assert 3 <= len(batches) <= 12, summary  # not one job per slide, nor one for all
    print("\n".join(summary))


def test_fixed_runtimes_of_the_profile_stay_under_the_cap_on_every_attempt():
    """The rules whose time the profile sets (training, evaluation, ...) ask for less than the default cap
    on their last attempt too."""
    profile = yaml.safe_load(PROFILE.read_text())
    attempts = profile["retries"] + 1
    runtimes = {"default": profile["default-resources"]["runtime"]}
    runtimes |= {rule: res["runtime"] for rule, res in profile["set-resources"].items() if "runtime" in res}
    assert {"default", "train", "evaluate", "heatmap"} <= set(runtimes)
    assert "tile" not in runtimes and "extract" not in runtimes  # theirs come from the runtime model
    for rule, expression in runtimes.items():
        assert eval(str(expression), {"attempt": attempts}) <= MAX_MINUTES, rule


def test_the_runtime_model_counts_the_tile_readers_extraction_starts_by_default(monkeypatch):
    """resources.smk estimates extraction time from the readers `extract.workers` leaves to pathmil
    (pathmil.features.extract.default_workers): the same number on a CPU and on a GPU, for every thread
    count, so a job's request follows what it will run."""
    import torch

    from pathmil.features.extract import default_workers

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    scope = {
        "config": {"slurm": {"max_runtime": 24}, "extract": {}, "slides": {}},
        "FACTS": schema["x-pathmil"], "SLIDES": {}, "ENCODERS": {}, "os": os,
    }  # fmt: skip
    exec(compile((ROOT / "workflow" / "rules" / "resources.smk").read_text(), "resources.smk", "exec"), scope)
    gflops = schema["x-pathmil"]["encoder_gflops"]["uni"] * 1e9
    for threads in (1, 4, 16, 32):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        for device, gpus, flops in [("cpu", 0, scope["CPU_FLOPS"] * threads), ("cuda", 1, scope["GPU_FLOPS"])]:
            extract = {"encoder": "uni", "gpus": gpus, "device": "auto", "threads": threads, "workers": None}
            readers = default_workers(torch.device(device))
            expected = scope["READ_SECONDS"] / readers + gflops / flops
            assert scope["seconds_per_tile"](extract) == pytest.approx(expected), (device, threads)
    explicit = {"encoder": "uni", "gpus": 1, "device": "auto", "threads": 32, "workers": 3}
    assert scope["seconds_per_tile"](explicit) == pytest.approx(scope["READ_SECONDS"] / 3 + gflops / scope["GPU_FLOPS"])
