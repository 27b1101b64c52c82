"""The GPU check (scripts/gpu_check.sh, benchmarks/gpu_check.py): its dry run on the CPU, and its helpers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

# what every step of a dry run ends as on a machine without a GPU
DRY_RUN_STATUS = {
    "info": "pass",
    "data": "pass",
    "train": "pass",
    "build": "skipped",  # nothing is built on the CPU
    "tests": "skipped",  # the GPU tests skip themselves without a GPU
    "mamba": "pass",
    "extract": "pass",
    "workflow": "pass",
}


@pytest.mark.slow
def test_dry_run_reports_every_step(tmp_path, real_data):
    """`scripts/gpu_check.sh --dry-run` runs every step's plumbing on the CPU and writes both reports."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    statuses = {step["name"]: step["status"] for step in report["steps"]}
    assert statuses == DRY_RUN_STATUS, [
        s for s in report["steps"] if s["status"] != DRY_RUN_STATUS[s["name"]]
    ]
    for step in report["steps"]:
        assert step["verdict"] and step["seconds"] is not None, step
        assert f"[gpu-check] {step['name']}: {step['status'].upper()}" in done.stdout
    steps = {step["name"]: step for step in report["steps"]}
    table = steps["train"]["results"]["table"]
    train_rows = [dict(zip(table["columns"], row)) for row in table["rows"]]
    assert {row["aggregator"] for row in train_rows} == {"abmil", "mhim_abmil"}
    for row in train_rows:  # both "devices" are the CPU here: the same epochs, metrics and scores
        assert row["|diff|"] == 0 and row["judged gap"] == 0, row
        assert row["scores CUDA vs CPU: max |diff| / range"] == 0, row
        cpu_epoch, gpu_epoch = row["best epoch CPU/CUDA"].split("/")
        assert cpu_epoch == gpu_epoch, row
    workflow = steps["workflow"]["results"]  # a plan: every extraction (6 slides) and training job asks a GPU
    assert workflow["gpu_jobs"] == {"extract": 6, "train": workflow["planned_jobs"]["train"]}
    assert workflow["planned_jobs"]["train"] >= 2  # abmil on 2 folds
    # the steps without the kernels run first, while the kernels build
    assert [step["name"] for step in report["steps"]] == list(gpu_check.STEPS)
    assert gpu_check.STEPS.index("build") > gpu_check.STEPS.index("workflow")
    per_slide = steps["data"]["results"]["extract_per_slide"]  # where extraction time went
    assert per_slide["slides"] == 8 and per_slide["mean_s"]["total"] > 0
    assert "inside extract_slide" in steps["data"]["verdict"]
    extract = steps["extract"]
    assert extract["results"]["one_reader_tiles_per_s"] > 0 and "one reader alone" in extract["verdict"]
    readers = [row[3] for row in extract["results"]["table"]["rows"]]
    assert readers[-1] == max(1, gpu_check.n_cpus() - 1)  # the last run: a reader per core but one
    assert "load_average" in extract["results"] and extract["results"]["build_running"] is False
    markdown = (out / "gpu_check.md").read_text()
    for name, status in DRY_RUN_STATUS.items():
        assert f"| {name} | {status} |" in markdown
    for section in ("## train", "## mamba", "## extract", "## tests"):
        assert section in markdown
    assert (out / "gpu_check.log").stat().st_size > 0


def test_a_step_stopped_by_its_limit_keeps_what_it_measured(tmp_path):
    """A step killed by `timeout` (exit 124) is recorded as timeout with the results it had saved."""
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    step = gpu_check.Step("extract", argparse.Namespace(work=work, out=out, dry_run=False))
    step.save(table={"columns": ["encoder"], "rows": [["uni"]]})
    common = ["--work", str(work), "--out", str(out)]
    gpu_check.main(
        ["finish", *common, "--step", "extract", "--rc", "124", "--seconds", "90", "--limit", "90"]
    )
    record = json.loads((work / "steps" / "extract.json").read_text())
    assert record["status"] == "timeout" and record["seconds"] == 90
    assert record["results"]["table"]["rows"] == [["uni"]]
    assert "| extract | timeout | 90 |" in (out / "gpu_check.md").read_text()
    gpu_check.main(["finish", *common, "--step", "workflow", "--rc", "1", "--seconds", "3"])
    assert json.loads((work / "steps" / "workflow.json").read_text())["status"] == "error"


SETUP_PY = """
from packaging.version import Version

bare_metal_version = Version("13.0")
cc_flag = []
if True:
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_75,code=sm_75")
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_80,code=sm_80")
    if bare_metal_version >= Version("11.8"):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
    if bare_metal_version >= Version("13.0"):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_110,code=sm_110")
"""


def test_patch_setup_keeps_sm_90_alone(tmp_path):
    """mamba-ssm's and causal-conv1d's setup.py (as in their sdists) hard-code many architectures; the build
    keeps sm_90 alone, and an `if` left without its flags still parses."""
    setup = tmp_path / "setup.py"
    setup.write_text(SETUP_PY)
    gpu_check.patch_setup(setup)
    namespace: dict = {}
    exec(setup.read_text(), namespace)
    assert namespace["cc_flag"] == ["-gencode", "arch=compute_90,code=sm_90"]
    setup.write_text(SETUP_PY.replace("compute_90,code=sm_90", "compute_89,code=sm_89"))
    with pytest.raises(SystemExit, match="no -gencode pair for sm_90"):
        gpu_check.patch_setup(setup)


def test_fallback_wheels_only_where_the_installed_version_does_not_fit(tmp_path):
    import importlib.metadata

    version = importlib.metadata.version("scikit-learn")
    wheel = tmp_path / f"scikit_learn-{version}-cp312-cp312-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"")
    (tmp_path / "SPECS").write_text(f"scikit-learn=={version}\n")
    assert gpu_check.fallbacks(tmp_path) == []
    (tmp_path / "SPECS").write_text(f"scikit-learn>{version}\n")
    assert gpu_check.fallbacks(tmp_path) == [wheel]


def test_a_step_gives_its_subprocesses_what_its_limit_leaves(monkeypatch):
    """A step's subprocess (the cohort's extraction) ends before the step's own limit, so the step can
    still say where the time went: inside the slides' tile loops or between them."""
    monkeypatch.delenv("GPU_CHECK_STEP_LIMIT_S", raising=False)
    assert gpu_check.seconds_left() is None
    monkeypatch.setenv("GPU_CHECK_STEP_LIMIT_S", "100")
    monkeypatch.setattr(gpu_check, "STARTED", gpu_check.time.time() - 30)
    assert 50 <= gpu_check.seconds_left(margin=15) <= 55
    monkeypatch.setattr(gpu_check, "STARTED", gpu_check.time.time() - 300)
    assert gpu_check.seconds_left() == 1.0
    facts = [
        {"n_tiles": 100, "workers": 8, "seconds": {"total": 0.5, "wait_for_tiles": 0.1, "encode": 0.4}},
        {"n_tiles": 140, "workers": 8, "seconds": {"total": 0.7, "wait_for_tiles": 0.6, "encode": 0.1}},
    ]
    per_slide = gpu_check.per_slide_seconds(facts)
    assert per_slide == {
        "slides": 2,
        "tiles": 120.0,
        "mean_s": {"total": 0.6, "wait_for_tiles": 0.35, "encode": 0.25},
        "encode_s_in_order": [0.4, 0.1],  # the first slide's warm-up apart from the others
        "readers": [8],
    }
    line = gpu_check.extract_diagnosis({"extract_per_slide": per_slide, "extract_wall_s": 30.0})
    assert line.startswith("2 slides in 30 s, 1 s of it inside extract_slide")
    assert "no slide finished in 95.0 s" in gpu_check.extract_diagnosis(
        {"extract_per_slide": {"slides": 0}, "extract_wall_s": 95.0, "extract_log": "loading"}
    )
