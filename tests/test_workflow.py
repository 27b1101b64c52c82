"""The Snakemake workflow end to end: validation, a reduced demo run, reruns, failures, lint and format."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
from workflow_helpers import ROOT, job_counts, snakemake, workflow_copy, write_config

RULES = [
    "demo",
    "cohort",
    "tile",
    "extract",
    "collect",
    "split",
    "train",
    "evaluate",
    "heatmap",
    "summary",
    "all",
]
# every family the demo trains: MHIM-MIL starts its teacher from the abmil run of the same fold
AGGREGATORS = ["abmil", "mhim_abmil", "mambamil"]


def mini_config(weights, **changes) -> dict:
    config = {
        "cohort": "mini",
        "slides": {"demo": {"n_slides": 12, "seed": 3, "size": [1536, 1536]}},
        "tile": {"preset": "bwh_biopsy"},
        "extract": {"encoder": "mobilenet_v2", "weights": str(weights), "batch_size": 32, "workers": 0},
        "split": {"folds": 2, "val_frac": 0.25},
        "tasks": {
            "classification": {"target": ["label"]},
            "survival": {"target": ["time", "event"], "task_options": {"n_bins": 2}},
            "regression": {"target": ["stil"]},
        },
        "aggregators": AGGREGATORS,
        "train": {"epochs": 3, "min_epochs": 1, "patience": 2},
        "models": {"mambamil": {"model": {"d_model": 32, "d_state": 8}}},  # small: CPU time
        "evaluate": {"n_bootstrap": 20},
        "report": {"heatmaps": 1},
    }
    config.update(changes)
    return config


def test_dry_run_of_the_demo_config_lists_every_rule(tmp_path):
    work = workflow_copy(tmp_path / "w")
    dry = snakemake(work, "-n")
    counts = job_counts(dry.stdout + dry.stderr)
    assert set(RULES) <= set(counts), counts
    assert counts["tile"] == counts["extract"] == 40  # the demo's 40 slides, known before they exist
    assert counts["train"] == 3 * 3 * 3  # tasks x aggregators x folds of config/config.yaml


def test_bad_config_key_fails_at_validation(tmp_path, mobilenet_weights):
    work = workflow_copy(tmp_path / "w")
    config = mini_config(mobilenet_weights)
    config["tile"]["tile_pxx"] = 256
    done = snakemake(work, "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config)), check=False)
    assert done.returncode != 0
    assert (
        "config: unknown key 'tile.tile_pxx'; allowed: default_mpp, min_tissue, overlap"
        in done.stdout + done.stderr
    )


def test_cohort_table_without_a_column_fails_at_validation(tmp_path, mobilenet_weights):
    work = workflow_copy(tmp_path / "w")
    table = tmp_path / "cohort.csv"
    pd.DataFrame({"slide_id": ["a"], "path": ["a.svs"], "label": [1]}).to_csv(table, index=False)
    config = mini_config(mobilenet_weights, slides={"table": str(table)}, tasks={"classification": None})
    done = snakemake(work, "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config)), check=False)
    assert done.returncode != 0
    assert f"cohort table {table} lacks column(s) patient_id" in done.stdout + done.stderr


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end_and_a_second_run_does_nothing(tmp_path, mobilenet_weights):
    work = workflow_copy(tmp_path / "w")
    configfile = str(write_config(tmp_path / "c.yaml", mini_config(mobilenet_weights)))
    snakemake(work, "--cores", "2", "--configfile", configfile)
    results = work / "results" / "mini"
    summary = pd.read_csv(results / "report" / "summary.csv")
    assert set(summary["task"]) == {"classification", "survival", "regression"}
    assert set(summary["aggregator"]) == set(AGGREGATORS)
    assert pd.read_csv(results / "failures.csv").empty
    n_patients = pd.read_csv(results / "cohort_ok.csv")["patient_id"].nunique()
    for task in ("classification", "survival", "regression"):
        for aggregator in AGGREGATORS:
            result = json.loads((results / "eval" / task / aggregator / "metrics.json").read_text())
            assert result["n_test_bags"] == n_patients
        teacher = (results / "models" / task / "abmil" / "fold0" / "best.pt").resolve()
        mhim_log = (results / "logs" / "train" / task / "mhim_abmil" / "fold0.log").read_text()
        assert str(teacher) in mhim_log or "abmil/fold0/best.pt" in mhim_log  # the teacher's start
    for slide in pd.read_csv(results / "cohort.csv")["slide_id"]:
        assert (results / "logs" / "tile" / f"{slide}.log").is_file()  # a log per rule and job
    again = snakemake(work, "--cores", "2", "--configfile", configfile)
    assert "Nothing to be done" in again.stdout + again.stderr
    report = work / "report.html"
    snakemake(work, "--configfile", configfile, "--report", str(report))
    html = report.read_text(errors="ignore")
    assert report.stat().st_size > 10_000 and "summary.csv" in html
    first = pd.read_csv(results / "cohort.csv")["slide_id"][0]
    for task in ("classification", "survival", "regression"):
        assert (results / "eval" / task / "abmil" / "heatmaps" / f"{first}.png").stat().st_size > 1000
        assert (results / "eval" / task / "abmil" / "plots").is_dir()
        assert "heatmap" in html and "roc" in html


@pytest.mark.slow
def test_slide_folder_failures_are_recorded_and_touching_a_slide_reruns_its_chain(
    tmp_path, demo_cohort, slides_dir, mobilenet_weights
):
    folder = tmp_path / "slides"
    folder.mkdir()
    for path in sorted((demo_cohort / "slides").iterdir())[:2]:
        shutil.copy(path, folder / path.name)
    for bad in ("unreadable.svs", "unopenable.tiff"):
        shutil.copy(slides_dir / bad, folder / bad)
    work = workflow_copy(tmp_path / "w")
    config = mini_config(mobilenet_weights, slides={"dir": str(folder)}, tasks={})
    config["tile"]["default_mpp"] = 0.5
    configfile = str(write_config(tmp_path / "c.yaml", config))
    snakemake(work, "--cores", "2", "--configfile", configfile)
    results = work / "results" / "mini"
    failures = pd.read_csv(results / "failures.csv")
    assert sorted(failures["slide_id"]) == ["unopenable", "unreadable"]
    assert set(failures["stage"]) == {"tile"}
    ok = pd.read_csv(results / "cohort_ok.csv")
    assert len(ok) == 2
    for slide in ok["slide_id"]:
        assert (results / "features" / "mobilenet_v2" / f"{slide}.h5").is_file()
    time.sleep(1)
    os.utime(folder / f"{ok['slide_id'][0]}.tiff")
    dry = snakemake(work, "-n", "--configfile", configfile)
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts == {"tile": 1, "extract": 1, "collect": 1, "all": 1}


def test_lint_and_format():
    lint = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True
    )
    assert lint.returncode == 0 and "Lints for" not in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    snakefmt = shutil.which("snakefmt", path=os.path.dirname(sys.executable))
    fmt = subprocess.run(
        [snakefmt, "--check", "Snakefile", "workflow"], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
