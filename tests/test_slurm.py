"""The workflow on a real SLURM cluster, through the project's profile (workflow/profiles/slurm).

scripts/slurm_cluster.sh starts a one-node cluster on this machine (slurmctld, slurmd, slurmdbd on MariaDB,
munge; a node with placeholder GPUs) and scripts/run_tests.sh calls it before pytest. Without a running
cluster these tests fail and name the command that starts it; PATHMIL_SKIP_SLURM=1 makes run_tests.sh
deselect them, saying so. Every job is checked in SLURM's own accounting (sacct), not in Snakemake's log.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
CONFIGS = ROOT / "tests" / "slurm"
SACCT_FIELDS = ["JobID", "State", "Comment", "ReqTRES", "AllocTRES", "ReqMem"]


@pytest.fixture(scope="module")
def node() -> dict[str, int]:
    """CPUs and memory of the running test node; a failure naming the fix when there is no cluster."""
    status = subprocess.run(
        [ROOT / "scripts" / "slurm_cluster.sh", "status"], capture_output=True, text=True, check=False
    )
    if status.returncode != 0:
        pytest.fail(
            "the SLURM test cluster is not running: start it with `scripts/slurm_cluster.sh start` (as root)"
            f" or run scripts/run_tests.sh.\n{status.stdout}{status.stderr}"
        )
    text = subprocess.run(
        ["scontrol", "show", "node", "localhost"], capture_output=True, text=True, check=True
    ).stdout
    return {
        "cpus": int(re.search(r"CPUTot=(\d+)", text)[1]),
        "mem_mb": int(re.search(r"RealMemory=(\d+)", text)[1]),
    }


def snakemake(workdir: Path, node: dict[str, int], *args: str, env: dict[str, str] | None = None) -> str:
    """Run snakemake with the SLURM profile in ``workdir``; its output, after asserting that it succeeded.

    The interpreter's bin folder goes first on PATH, as in an activated environment, so jobs find its
    `pathmil`. Overrides for the one small node: status checks from the first second (not the profile's
    40 s), and batches no larger than the node (the profile's 8 cores and 32 GB are for real clusters).
    """
    env = {**os.environ, **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    command = [sys.executable, "-m", "snakemake", "--profile", str(PROFILE)]
    command += ["--slurm-init-seconds-before-status-checks", "1", "--cores", str(node["cpus"])]
    command += [*args, "--resources", f"mem_mb={node['mem_mb']}", "gpu=1"]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def submitted(output: str) -> tuple[str, list[str]]:
    """The run's SLURM job name (the plugin's run id) and the SLURM job ids it submitted."""
    run_id = re.search(r"SLURM run ID: (\S+)", output)[1]
    return run_id, re.findall(r"has been submitted with SLURM jobid (\d+)", output)


def sacct(run_id: str, n_jobs: int) -> pd.DataFrame:
    """SLURM's accounting records of a run's jobs, once all ``n_jobs`` are final (sacct lags a little)."""
    command = ["sacct", "-X", "-n", "-P", "--name", run_id, "-S", "now-1days", "-o", ",".join(SACCT_FIELDS)]
    for _ in range(40):
        lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
        jobs = pd.DataFrame([line.split("|") for line in lines], columns=SACCT_FIELDS, dtype=str)
        final = jobs["State"].isin(["COMPLETED", "FAILED"]).all() and (jobs["ReqTRES"] != "").all()
        if len(jobs) == n_jobs and final:
            return jobs.sort_values("JobID", key=lambda ids: ids.astype(int), ignore_index=True)
        time.sleep(0.5)
    raise AssertionError(f"sacct does not list {n_jobs} finished jobs named {run_id}:\n{jobs}")


def key_values(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


@pytest.mark.slow
def test_demo_workflow_runs_as_slurm_jobs(node, tmp_path, mobilenet_weights):
    """The reduced demo through sbatch: every job a COMPLETED SLURM job; tiling and extraction of the
    slides in one batch job that asked SLURM for the GPU of `extract.gpus`."""
    work = tmp_path / "pathmil"
    work.mkdir()
    for name in ["Snakefile", "config", "workflow", "envs"]:  # a copy: nothing lands in the repository
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, work / name)
    config = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    config["extract"]["weights"] = str(mobilenet_weights)  # absolute: jobs run in the copy
    (work / "slurm_demo.yaml").write_text(yaml.safe_dump(config))
    args = ["--configfile", "slurm_demo.yaml"]

    output = snakemake(work, node, *args)
    run_id, job_ids = submitted(output)
    jobs = sacct(run_id, len(job_ids))
    assert sorted(jobs["JobID"]) == sorted(job_ids)
    assert (jobs["State"] == "COMPLETED").all(), jobs
    # the demo as one job; tiling and extraction of the three slides together as one batch job (group
    # "slides_0", with the batch's record), which asked for and got the GPU of `extract.gpus`
    assert sorted(jobs["Comment"]) == ["rule_demo", "rule_slides_0_batch_extract_tile"]
    slides_job = jobs.set_index("Comment").loc["rule_slides_0_batch_extract_tile"]
    for tres in ["ReqTRES", "AllocTRES"]:
        assert "gres/gpu=1" in slides_job[tres].split(",")
    # the bookkeeping rules ran where snakemake runs, not as cluster jobs
    assert set(re.findall(r"localrule (\w+):", output)) == {
        "all",
        "settings",
        "cohort",
        "collect",
        "qc_gallery",
    }

    results = work / "results" / "slurm_demo"
    table = pd.read_csv(results / "cohort.csv", dtype={"slide_id": str})
    assert len(table) == 3
    for slide in table["slide_id"]:
        facts = pd.read_json(results / "tiles" / f"{slide}.json", typ="series")
        assert facts["status"] == "ok" and facts["n_tiles"] > 0
        assert (results / "tiles" / f"{slide}.h5").is_file()
    with_features = pd.read_csv(results / "cohort_ok.csv", dtype={"slide_id": str})
    assert sorted(with_features["slide_id"]) == sorted(table["slide_id"])  # no slide failed extraction
    for slide in table["slide_id"]:
        with h5py.File(results / "features" / "mobilenet_v2" / f"{slide}.h5") as bag:
            assert bag["features"].shape[1] == 1280

    again = snakemake(work, node, *args)
    assert "Nothing to be done" in again
    assert "submitted with SLURM jobid" not in again


def test_gpu_request_environment_and_retry_with_more_memory(node, tmp_path):
    """A rule's `gpu` resource reaches sbatch and SLURM; jobs see the caller's environment; a retry asks
    SLURM for more memory."""
    token = secrets.token_hex(8)
    output = snakemake(
        tmp_path,
        node,
        "--snakefile",
        str(CONFIGS / "gpu.smk"),
        "--verbose",  # logs the sbatch calls
        env={"PATHMIL_SLURM_TOKEN": token},
    )
    run_id, job_ids = submitted(output)
    jobs = sacct(run_id, 3).set_index("Comment", append=True)

    gpu_sbatch = [
        line for line in output.splitlines() if line.startswith("sbatch call:") and "gpu_probe" in line
    ]
    assert len(gpu_sbatch) == 1 and " --gpus=1 " in gpu_sbatch[0]
    gpu_job = jobs.xs("rule_gpu_probe", level="Comment").iloc[0]
    assert gpu_job["State"] == "COMPLETED"
    assert "gres/gpu=1" in gpu_job["ReqTRES"].split(",") and "gres/gpu=1" in gpu_job["AllocTRES"].split(",")

    seen = key_values(tmp_path / "gpu_probe.txt")
    assert seen["SLURM_JOB_ID"] == gpu_job["JobID"]
    assert seen["CUDA_VISIBLE_DEVICES"] == "0" and seen["SLURM_GPUS_ON_NODE"] == "1"
    assert seen["PATHMIL_SLURM_TOKEN"] == token  # the caller's environment reached the job
    assert seen["pathmil"] == shutil.which("pathmil", path=str(Path(sys.executable).parent))

    # the profile retries a failed job; its default memory (2000 MB x attempt) doubles on the second try
    retries = jobs.xs("rule_retry_probe", level="Comment")
    assert retries["State"].tolist() == ["FAILED", "COMPLETED"]
    assert retries["ReqMem"].tolist() == ["2000M", "4000M"]
    assert key_values(tmp_path / "retry_probe.txt") == {"mem_mb": "4000"}
    assert sorted(job_ids) == sorted(jobs["JobID"])
