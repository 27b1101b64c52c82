"""The Snakemake workflow end to end: validation, a reduced demo run, reruns, failures, lint and format."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from workflow_helpers import ROOT, job_counts, snakemake, workflow_copy, write_config

from pathmil.features.encoders import list_encoders

RULES = [
    "settings",
    "demo",
    "cohort",
    "tile",
    "extract",
    "batch",
    "collect",
    "split",
    "train",
    "evaluate",
    "compare",
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


def test_a_grid_of_encoders_and_seeds_plans_every_configuration(tmp_path, mobilenet_weights):
    config = mini_config(mobilenet_weights, seeds=[0, 1, 2])
    config["extract"] = {
        "encoder": ["mobilenet_v2", "timm:resnet18"],
        "per_encoder": {
            "mobilenet_v2": {"weights": str(mobilenet_weights)},
            "timm:resnet18": {"random_init": True},
        },
    }
    dry = snakemake(
        workflow_copy(tmp_path / "w"), "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config))
    )
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts["tile"] == 12 and counts["extract"] == 2 * 12  # tiles shared, features per encoder
    assert counts["train"] == 3 * 2 * len(AGGREGATORS) * 3 * 2  # task x encoder x aggregator x seed x fold
    assert counts["evaluate"] == 3 * 2 * len(AGGREGATORS) * 3 and counts["compare"] == 3
    assert "results/mini/features/timm-resnet18-random/" in dry.stdout + dry.stderr


def test_a_search_runs_inside_each_fold_before_its_training(tmp_path, mobilenet_weights):
    config = mini_config(mobilenet_weights, tasks={"classification": None}, search={"n_trials": 4, "jobs": 2})
    work = workflow_copy(tmp_path / "w")
    dry = snakemake(work, "-n", "-p", "--configfile", str(write_config(tmp_path / "c.yaml", config)))
    counts = job_counts(dry.stdout + dry.stderr)
    runs = len(AGGREGATORS) * 2  # aggregator x fold
    assert counts["search_trials"] == 2 * runs and counts["search"] == runs and counts["train"] == runs
    assert (
        "--config results/mini/search/classification/mobilenet_v2/abmil/seed0/fold0/best.yaml" in dry.stdout
    )


def test_only_the_tasks_the_config_names_are_trained(tmp_path, mobilenet_weights):
    config = mini_config(mobilenet_weights, tasks={"survival": None})
    dry = snakemake(
        workflow_copy(tmp_path / "w"), "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config))
    )
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts["train"] == len(AGGREGATORS) * 2 and counts["split"] == 1, counts


def test_bad_config_key_fails_at_validation(tmp_path, mobilenet_weights):
    work = workflow_copy(tmp_path / "w")
    config = mini_config(mobilenet_weights)
    config["tile"]["tile_pxx"] = 256
    done = snakemake(work, "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config)), check=False)
    assert done.returncode != 0
    assert "config: Additional properties are not allowed ('tile_pxx' was unexpected) (in tile)" in (
        done.stdout + done.stderr
    )


def test_cohort_table_without_a_column_fails_at_validation(tmp_path, mobilenet_weights):
    work = workflow_copy(tmp_path / "w")
    table = tmp_path / "cohort.csv"
    pd.DataFrame({"slide_id": ["a"], "path": ["a.svs"], "label": [1]}).to_csv(table, index=False)
    config = mini_config(mobilenet_weights, slides={"table": str(table)}, tasks={"classification": None})
    done = snakemake(work, "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config)), check=False)
    assert done.returncode != 0
    assert f"cohort table {table} lacks column(s) patient_id" in done.stdout + done.stderr


def table_config(tmp_path, weights, rows: list[dict], **changes) -> str:
    table = tmp_path / "cohort.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    for row in rows:
        (tmp_path / str(row["path"])).write_bytes(b"")
    config = mini_config(weights, slides={"table": str(table)}, **changes)
    return str(write_config(tmp_path / "c.yaml", config))


GOOD = {
    "slide_id": "s1",
    "patient_id": "p1",
    "path": "a.svs",
    "label": 1,
    "time": 5.0,
    "event": 1,
    "stil": 40,
}


# Bad tables are refused here and by the CLI with the same words: tests/test_bad_tables.py feeds each kind
# to both. These are the settings the dry run checks against the package's registries and declarations.
@pytest.mark.parametrize(
    ("rows", "changes", "message"),
    [
        ([GOOD], {"aggregators": ["abmill"]}, "'abmill' is not one of ['abmil'"),
        ([GOOD], {"models": {"mambamil": {"model": {"d_modl": 64}}}}, "('d_modl' was unexpected) (in models.mambamil.model)"),
        ([GOOD], {"tasks": {"survival": {"task_options": {"n_bin": 2}}}}, "('n_bin' was unexpected) (in tasks.survival.task_options)"),
        ([GOOD], {"train": {"lr": 0}}, "0 is less than or equal to the minimum of 0 (in train.lr)"),
        ([GOOD], {"extract": {"encoder": "mobilenet_v3"}}, f"config: 'mobilenet_v3' is not one of {list_encoders()} nor a string matching '^timm:.+' (in extract.encoder)\n"),
        ([GOOD], {"extract": {"encoder": ["mobilenet_v2", "resnet5O"]}}, f"config: 'resnet5O' is not one of {list_encoders()} nor a string matching '^timm:.+' (in extract.encoder[1])\n"),
        ([GOOD], {"models": {"abmil": {"optimizer": "adamww"}}}, "config: 'adamww' is not one of ['adam', 'adamw'] (in models.abmil.optimizer)\n"),
        ([GOOD], {"models": {"abmill": {"lr": 1e-4}}}, "('abmill' was unexpected) (in models); known keys: abmil, abmil_gated, dsmil,"),
        ([GOOD], {"split": {"bag_level": "slide"}}, "('bag_level' was unexpected) (in split)"),
        ([{**GOOD, "mpp": 352.8}], {}, "slide s1: mpp is 352.8; it must be a number of um/px in [0.05, 20]"),
        ([{**GOOD, "tissue": "s1.geojson"}], {}, "tissue file "),
        ([GOOD], {"extract": {"encoder": ["mobilenet_v2", "resnet50_trunc"], "weights": "w.pth"}}, "would load into every encoder"),
        ([GOOD], {"extract": {"encoder": "mobilenet_v2", "weights": "nowhere.pth"}}, "weights file nowhere.pth of encoder mobilenet_v2 does not exist"),
    ],
    ids=["aggregator", "model-key", "task-option", "lr", "encoder", "encoder-in-list", "optional-choice",
         "models-section", "split-bag-level", "mpp", "tissue",
         "shared-weights", "missing-weights"],
)  # fmt: skip
def test_bad_settings_fail_when_the_workflow_parses(tmp_path, mobilenet_weights, rows, changes, message):
    """Everything a later stage would refuse is refused by the dry run, before any slide is tiled."""
    configfile = table_config(tmp_path, mobilenet_weights, rows, **changes)
    done = snakemake(workflow_copy(tmp_path / "w"), "-n", "--configfile", configfile, check=False)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]


def test_a_given_tissue_outline_and_mpp_reach_their_slides_tile_job(tmp_path, mobilenet_weights):
    """The table's `tissue` column (relative to the table) reaches `pathmil tile --tissue-geojson` of that
    slide only, its `mpp` column `--table-mpp` (so the facts say mpp_source 'table': tests/
    test_slide_geometry.py); each tile job declares the GeoJSON it writes."""
    (tmp_path / "s1 outline.geojson").write_text("{}")
    rows = [
        {**GOOD, "tissue": "s1 outline.geojson", "mpp": 0.25},
        {**GOOD, "slide_id": "s2", "path": "b.svs", "patient_id": "p2"},
    ]
    configfile = table_config(tmp_path, mobilenet_weights, rows, tasks={"classification": None})
    done = snakemake(workflow_copy(tmp_path / "w"), "-n", "-p", "--configfile", configfile)
    lines = (done.stdout + done.stderr).splitlines()
    tile_jobs = [line for line in lines if line.removeprefix("Shell command: ").startswith("pathmil tile ")]
    assert len(tile_jobs) == 2 and all("--geojson results/mini/tiles/" in line for line in tile_jobs)
    given = [line for line in tile_jobs if "--tissue-geojson" in line]
    assert len(given) == 1 and f"--tissue-geojson '{tmp_path / 's1 outline.geojson'}'" in given[0]
    assert "--slide-id=s1" in given[0] and "--table-mpp 0.25 " in given[0]
    assert not any("-mpp" in line for line in tile_jobs if line not in given)


def test_slide_level_labels_pass_with_bag_level_slide(tmp_path, mobilenet_weights):
    """train.bag_level is the one fact: the dry run skips the patient-label check and each task's split
    settings file carries the bag level (so `pathmil split` stratifies per slide)."""
    rows = [GOOD, {**GOOD, "slide_id": "s2", "path": "b.svs", "label": 0}]
    rows += [
        {**row, "slide_id": f"{row['slide_id']}b", "path": f"b{row['path']}", "patient_id": "p2"}
        for row in rows
    ]
    configfile = table_config(tmp_path, mobilenet_weights, rows, train={"bag_level": "slide"})
    done = snakemake(workflow_copy(tmp_path / "w"), "-n", "-p", "--configfile", configfile)
    assert job_counts(done.stdout + done.stderr)["tile"] == 4
    assert (done.stdout + done.stderr).count("printf '%s' 'split:\n  bag_level: slide\n") == 3  # one per task


def test_a_real_cohort_parses_with_only_snakemake(tmp_path, mobilenet_weights):
    """With `--sdm conda` the snakemake process has no pathmil and none of its dependencies (the SLURM
    plugin brings pandas): the workflow must still parse, validate and plan every job."""
    rows = [
        {**GOOD, "slide_id": f"s{i}", "patient_id": f"p{i}", "path": f"{i}.svs", "label": i % 2}
        for i in range(4)
    ]
    configfile = table_config(tmp_path, mobilenet_weights, rows)
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('pathmil', 'torch', 'h5py', 'cv2', 'openslide', 'sklearn', 'timm')]"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{blocked}; from snakemake.cli import main; main()",
            "-n",
            "--configfile",
            configfile,
        ],
        cwd=workflow_copy(tmp_path / "w"),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert job_counts(done.stdout + done.stderr)["train"] == 3 * 3 * 2


def fake_package(path: Path, **changes) -> Path:
    """A package's manifest alone (a dry run reads nothing else): survival ABMIL on MobileNetV2 features of
    1 um/px tiles of 128 px with the biopsy preset."""
    from pathmil.slide.tile import TileConfig

    manifest = {
        "format": "pathmil-package",
        "format_version": 1,
        "task": {"name": "survival", "label_columns": ["time", "event"]},
        "aggregator": "abmil",
        "encoder": {"name": "mobilenet_v2", "weights_sha256": "ab" * 32, "random_init": False, "dim": 1280},
        "tiling": TileConfig(target_mpp=1.0, tile_px=128, preset="bwh_biopsy").tiling(),
        "members": [],
        **changes,
    }
    path.mkdir(parents=True)
    (path / "package.json").write_text(json.dumps(manifest))
    return path


def settings_of(work: Path, configfile: Path, dry_output: str, name: str) -> dict:
    """Write one settings file the dry run planned (rule `settings`, a printf) and read it back."""
    import re

    import yaml

    found = sorted(set(re.findall(rf"results/[^ \n]*/settings/{name}\.[0-9a-f]{{12}}\.yaml", dry_output)))
    assert len(found) == 1, found
    snakemake(work, found[0], "--cores", "1", "--configfile", str(configfile))
    return yaml.safe_load((work / found[0]).read_text())


def test_a_deploy_config_tiles_and_encodes_as_its_package_and_plans_the_external_validation(
    tmp_path, mobilenet_weights
):
    work = workflow_copy(tmp_path / "w")
    package = fake_package(tmp_path / "model.pathmil")
    config = mini_config(
        mobilenet_weights, tile={}, tasks={"survival": None}, deploy={"package": str(package), "heatmaps": 2}
    )
    config["extract"].pop("encoder")
    configfile = write_config(tmp_path / "c.yaml", config)
    dry = snakemake(work, "-n", "--configfile", str(configfile))
    text = dry.stdout + dry.stderr
    counts = job_counts(text)
    assert counts["deploy_predict"] == counts["deploy_evaluate"] == 1 and counts["deploy_heatmap"] == 2
    assert counts["tile"] == counts["extract"] == 12 and "train_transfer" not in counts
    tile = settings_of(work, configfile, text, "tile")["tile"]
    assert (tile["target_mpp"], tile["tile_px"], tile["preset"]) == (1.0, 128, "bwh_biopsy")
    assert tile["tissue"] == json.loads((package / "package.json").read_text())["tiling"]["tissue"]
    assert settings_of(work, configfile, text, "extract-mobilenet_v2")["extract"]["encoder"] == "mobilenet_v2"


def test_a_deploy_config_on_a_slide_folder_scores_each_slide_without_labels(tmp_path, mobilenet_weights):
    folder = tmp_path / "new slides"
    folder.mkdir()
    for name in ("a.tiff", "b.svs"):
        (folder / name).write_bytes(b"")  # a dry run reads the folder's names only
    config = mini_config(mobilenet_weights, slides={"dir": str(folder)}, tasks={})
    config["deploy"] = {"package": str(fake_package(tmp_path / "model.pathmil")), "heatmaps": 1}
    dry = snakemake(
        workflow_copy(tmp_path / "w"),
        "-n",
        "-p",
        "--configfile",
        str(write_config(tmp_path / "c.yaml", config)),
    )
    text = dry.stdout + dry.stderr
    counts = job_counts(text)
    assert counts["deploy_predict"] == counts["deploy_heatmap"] == 1 and "deploy_evaluate" not in counts, (
        counts
    )
    assert "train" not in counts and "summary" not in counts
    command = next(line for line in text.splitlines() if "predict --package" in line)
    assert (
        "--features results/mini/features/mobilenet_v2/a.h5 results/mini/features/mobilenet_v2/b.h5"
        in command
    )
    assert "--cohort" not in command  # a folder's slides have no patients: each bag is its slide


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tile": {"target_mpp": 0.5}}, "config tile.target_mpp is 0.5 but deploy.package"),
        ({"extract": {"encoder": "resnet50_trunc"}}, "config extract.encoder is resnet50_trunc but deploy.package"),
        ({"deploy": {"package": "nowhere.pathmil"}}, "deploy.package nowhere.pathmil is not a package (no package.json)"),
        ({"transfer": {"sources": ["{package}"], "baseline": "transmil"}}, "transfer.baseline transmil is not in aggregators"),
        ({"transfer": {"sources": ["{other}"]}}, "was trained on resnet50_trunc features, this cohort is encoded with mobilenet_v2"),
        ({"transfer": {"sources": ["{package}"], "baseline": "mhim_abmil"}, "aggregators": ["abmil", "mhim_abmil"]}, "transfer.baseline mhim_abmil cannot be fine-tuned"),
    ],
    ids=["tiling", "encoder", "missing", "baseline", "source-encoder", "wrapper-baseline"],
)  # fmt: skip
def test_deploy_and_transfer_settings_that_cannot_work_fail_when_the_workflow_parses(
    tmp_path, mobilenet_weights, changes, message
):
    package = fake_package(tmp_path / "model.pathmil")
    other = fake_package(
        tmp_path / "other.pathmil", encoder={"name": "resnet50_trunc", "random_init": False, "dim": 1024}
    )
    changes = json.loads(
        json.dumps(changes).replace("{package}", str(package)).replace("{other}", str(other))
    )
    config = mini_config(mobilenet_weights, tasks={"survival": None}, deploy={"package": str(package)})
    config["tile"] = {}
    for key, value in changes.items():
        config[key] = {**(config.get(key) or {}), **value} if isinstance(value, dict) else value
    done = snakemake(
        workflow_copy(tmp_path / "w"), "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config)),
        check=False,
    )  # fmt: skip
    assert done.returncode != 0 and message in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]


def test_transfer_trains_each_strategy_beside_the_baseline_and_compares_them(tmp_path, mobilenet_weights):
    sources = [fake_package(tmp_path / f"s{i}.pathmil") for i in range(2)]
    config = mini_config(
        mobilenet_weights,
        tasks={"survival": None, "classification": None},
        transfer={"sources": list(map(str, sources)), "tasks": ["survival"]},
    )
    config["models"]["moe_pkt"] = {"model": {"hidden": 16}}
    dry = snakemake(
        workflow_copy(tmp_path / "w"), "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config))
    )
    text = dry.stdout + dry.stderr
    counts = job_counts(text)
    # survival only: fine-tuned from each of the two sources, and MoE-PKT over both, on each of 2 folds
    assert counts["train_transfer"] == 3 * 2 and counts["compare_transfer"] == 1, counts
    assert "warning: config models.moe_pkt is set" not in text
    for strategy in ("finetune0", "finetune1", "moe_pkt"):
        assert f"results/mini/transfer/survival/{strategy}/fold1/metrics.json" in text


def run_until_killed(work, configfile, run_dir, min_epoch: int = 2) -> subprocess.CompletedProcess:
    """Run the workflow and SIGKILL the `pathmil train` job of ``run_dir`` once its last.pt holds
    ``min_epoch`` epochs (as the out-of-memory killer or a SLURM time limit would); return the run."""
    import signal

    import torch

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # the output goes to a file, not a pipe: nobody reads a pipe while this waits, and Snakemake blocks
    # once its 64 KB are full, before the train job starts (as it did with the longer job listings)
    log = Path(work) / "snakemake_killed_run.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", configfile],
            cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    deadline, killed = time.time() + 900, False
    while time.time() < deadline and process.poll() is None and not killed:
        try:
            state = torch.load(run_dir / "last.pt", weights_only=True)["state"]
        except (OSError, RuntimeError, EOFError, KeyError):
            state = {"epoch": 0}
        if state["epoch"] >= min_epoch and not (run_dir / "metrics.json").exists():
            found = subprocess.run(
                ["pgrep", "-f", f"train .*--out {run_dir.relative_to(work)}"], capture_output=True, text=True
            )
            for pid in found.stdout.split():
                os.kill(int(pid), signal.SIGKILL)
                killed = True
        time.sleep(0.02)
    process.wait(timeout=900)
    output = log.read_text()
    assert killed, "the train job was never caught mid-run: " + output[-3000:]
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end_and_reruns_exactly_what_changed(tmp_path, mobilenet_weights):
    """The reduced demo: a train job killed by SIGKILL mid-run recovers on the rerun and ends as if never
    killed; a second run does nothing; a changed setting or a deleted file plans exactly what depends on it."""
    work = workflow_copy(tmp_path / "w")
    config = mini_config(mobilenet_weights)
    config["models"]["abmil"] = {"epochs": 12, "min_epochs": 12}  # long enough to be caught mid-run
    configfile = str(write_config(tmp_path / "c.yaml", config))
    results = work / "results" / "mini"
    victim = results / "models" / "classification" / "mobilenet_v2" / "abmil" / "seed0" / "fold0"
    first = run_until_killed(work, configfile, victim)
    assert first.returncode != 0 and not (victim / "best.pt").exists() and (victim / "last.pt").exists()
    snakemake(work, "--cores", "2", "--configfile", configfile)  # recovers: resumes from last.pt
    reference = tmp_path / "uninterrupted"
    subprocess.run(
        [sys.executable, "-m", "pathmil", "train", "--features", str(results / "features" / "mobilenet_v2"),
         "--cohort", str(results / "cohort_ok.csv"), "--splits", str(results / "splits" / "classification.csv"),
         "--fold", "0", "--config", str(next((results / "settings").glob("train-classification-abmil-seed0.*.yaml"))),
         "--out", str(reference), "--no-progress"], check=True, capture_output=True,
    )  # fmt: skip
    resumed, clean = (json.loads((r / "metrics.json").read_text()) for r in (victim, reference))
    assert resumed["metrics"] == clean["metrics"] and resumed["best_epoch"] == clean["best_epoch"]
    pd.testing.assert_frame_equal(
        pd.read_csv(victim / "predictions.csv"), pd.read_csv(reference / "predictions.csv")
    )

    summary = pd.read_csv(results / "report" / "summary.csv")
    assert set(summary["task"]) == {"classification", "survival", "regression"}
    assert set(summary["aggregator"]) == set(AGGREGATORS)
    main = summary[summary["main"]].set_index(["task", "aggregator"])
    assert (main.loc["survival", "statistic"] == "mean over folds").all()  # the fold models' risk scales
    held = summary.dropna(subset=["ci_low", "ci_high"])  # every interval holds its estimate
    outside = held[(held["pooled"] < held["ci_low"] - 1e-9) | (held["pooled"] > held["ci_high"] + 1e-9)]
    assert outside.empty, outside[["task", "aggregator", "metric", "pooled", "ci_low", "ci_high"]]
    assert pd.read_csv(results / "failures.csv").empty
    n_patients = pd.read_csv(results / "cohort_ok.csv")["patient_id"].nunique()
    for task in ("classification", "survival", "regression"):
        for aggregator in AGGREGATORS:
            evaluation = results / "eval" / task / "mobilenet_v2" / aggregator / "seed0"
            result = json.loads((evaluation / "metrics.json").read_text())
            assert result["n_test_bags"] == n_patients
            assert (result["encoder"], result["seed"]) == ("mobilenet_v2", 0)
        teacher = (
            results / "models" / task / "mobilenet_v2" / "abmil" / "seed0" / "fold0" / "best.pt"
        ).resolve()
        mhim_log = (
            results / "logs" / "train" / task / "mobilenet_v2" / "mhim_abmil" / "seed0" / "fold0.log"
        ).read_text()
        comparison = json.loads((results / "eval" / task / "comparison" / "comparison.json").read_text())
        assert len(comparison["configurations"]) == len(AGGREGATORS)  # paired over the same patients
        assert str(teacher) in mhim_log or "mobilenet_v2/abmil/seed0/fold0/best.pt" in mhim_log  # the teacher
    for slide in pd.read_csv(results / "cohort.csv")["slide_id"]:
        assert (results / "logs" / "tile" / f"{slide}.log").is_file()  # a log per rule and job
    for log in (results / "logs").rglob("*.log"):  # no fragments of progress bars in any job's log
        assert "\r" not in log.read_text(errors="replace"), log
    history = pd.read_csv(
        results / "models" / "survival" / "mobilenet_v2" / "mambamil" / "seed0" / "fold1" / "history.csv"
    )
    train_log = (
        results / "logs" / "train" / "survival" / "mobilenet_v2" / "mambamil" / "seed0" / "fold1.log"
    ).read_text()
    logged = re.findall(r"fold 1 epoch (\d+)/3: train_loss \S+ val_loss \S+ val_c_index \S+", train_log)
    assert [int(epoch) for epoch in logged] == history["epoch"].tolist()  # a line per epoch, for tail -f
    again = snakemake(work, "--cores", "2", "--configfile", configfile)
    assert "Nothing to be done" in again.stdout + again.stderr

    def planned(changed: dict) -> dict[str, int]:
        path = write_config(tmp_path / "changed.yaml", changed)
        dry = snakemake(work, "-n", "--configfile", str(path))
        text = dry.stdout + dry.stderr
        return {} if "Nothing to be done" in text else job_counts(text)

    longer = json.loads(json.dumps(config))
    longer["train"]["epochs"] = 4
    counts = planned(longer)  # every run but abmil's (whose own epochs win), and what reads them
    assert counts["train"] == 3 * 2 * 2 and "tile" not in counts and "extract" not in counts, counts
    wider = json.loads(json.dumps(config))
    wider["models"]["mambamil"]["model"]["d_model"] = 48
    assert planned(wider)["train"] == 3 * 2  # mambamil's runs only
    assert planned(config) == {}  # settings changed back are the old settings files: nothing to do
    bag = next((results / "features" / "mobilenet_v2").glob("*.h5"))
    bag.rename(bag.with_suffix(".away"))  # a deleted bag; put back (with its mtime) after the plan
    try:
        counts = planned(config)
    finally:
        bag.with_suffix(".away").rename(bag)
    assert counts["extract"] == 1 and counts["collect"] == 1 and counts["train"] == 3 * 3 * 2, counts
    assert "tile" not in counts
    assert planned(config) == {}

    # across cohorts, on this cohort for speed: its survival ABMIL packaged, applied to its own slides as a
    # deploy cohort (tiled and encoded as before: nothing but the deploy jobs runs) and fine-tuned from
    package = work / "survival_abmil.pathmil"
    subprocess.run(
        [sys.executable, "-m", "pathmil", "package", "--runs",
         *map(str, sorted((results / "models" / "survival" / "mobilenet_v2" / "abmil" / "seed0").glob("fold*"))),
         "--evaluation", str(results / "eval" / "survival" / "mobilenet_v2" / "abmil" / "seed0"), "--out", str(package)],
        check=True, capture_output=True,
    )  # fmt: skip
    config["deploy"] = {"package": str(package), "heatmaps": 1}
    config["transfer"] = {"sources": [str(package)], "strategies": ["finetune"], "tasks": ["survival"]}
    configfile = str(write_config(tmp_path / "c.yaml", config))
    done = snakemake(work, "--cores", "2", "--configfile", configfile)
    counts = job_counts(done.stdout + done.stderr)
    assert "tile" not in counts and "extract" not in counts and "train" not in counts, counts
    assert counts["deploy_predict"] == counts["deploy_evaluate"] == counts["deploy_heatmap"] == 1, counts
    assert counts["train_transfer"] == 2 and counts["compare_transfer"] == 1, counts
    deployed = pd.read_csv(results / "deploy" / "predictions.csv")
    assert len(deployed) == n_patients and deployed["score"].notna().all()
    external = json.loads((results / "deploy" / "eval" / "metrics.json").read_text())
    assert external["external"] and external["task"] == "survival"
    summary = pd.read_csv(results / "report" / "summary.csv")
    assert "abmil (external)" in set(summary["aggregator"])
    compared = pd.read_csv(results / "transfer" / "survival" / "compare" / "comparison.csv")
    assert set(compared["configuration"]) == {"abmil", "abmil (fine-tuned)"}

    report = work / "report.html"
    built = snakemake(work, "--configfile", configfile, "--report", str(report))
    assert "ERROR/" not in built.stdout + built.stderr  # docutils' complaints about the front page
    html = report.read_text(errors="ignore")
    assert report.stat().st_size > 10_000 and "summary.csv" in html
    assert "System Message" not in html and "Results: main metric per task and aggregator" in html
    assert "External validation" in html and "comparison.csv" in html
    first_slide = pd.read_csv(results / "cohort.csv")["slide_id"][0]
    for task in ("classification", "survival", "regression"):
        assert (
            results / "eval" / task / "mobilenet_v2" / "abmil" / "heatmaps" / f"{first_slide}.jpg"
        ).stat().st_size > 1000
        assert (results / "eval" / task / "mobilenet_v2" / "abmil" / "seed0" / "plots").is_dir()
        assert "heatmap" in html and "roc" in html


# Names users give slides: spaces, quotes, shell syntax, non-ASCII letters, a leading dash. Each must be
# tiled and extracted and nothing may run: the names reach the shell only quoted.
HOSTILE = ["case 01 (re-scan)", "it's", 'say "hi"', "$(touch PWNED1)", "`touch PWNED2`", "a;touch PWNED3",
           "b&touch PWNED4", "Ünïcødé-Ø", "-rf"]  # fmt: skip


@pytest.mark.slow
def test_slide_folder_with_hostile_names_failures_recorded_and_touching_a_slide_reruns_its_chain(
    tmp_path, demo_cohort, slides_dir, mobilenet_weights
):
    folder = tmp_path / "slides"
    folder.mkdir()
    source = sorted((demo_cohort / "slides").iterdir())[2]
    for name in HOSTILE:
        shutil.copy(source, folder / f"{name}.tiff")
    for bad in ("unreadable.svs", "unopenable.tiff"):
        shutil.copy(slides_dir / bad, folder / bad)
    work = workflow_copy(tmp_path / "w")
    config = mini_config(mobilenet_weights, slides={"dir": str(folder)}, tasks={})
    config["tile"]["default_mpp"] = 0.5
    outlines = tmp_path / "outlines"  # a corrected tissue outline for one slide (tile.tissue_dir)
    outlines.mkdir()
    square = [[[200, 200], [1200, 200], [1200, 1200], [200, 1200], [200, 200]]]
    (outlines / "it's.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": square}))
    config["tile"]["tissue_dir"] = str(outlines)
    configfile = str(write_config(tmp_path / "c.yaml", config))
    snakemake(work, "--cores", "2", "--configfile", configfile)
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*")), "a slide name ran"
    results = work / "results" / "mini"
    failures = pd.read_csv(results / "failures.csv")
    assert sorted(failures["slide_id"]) == ["unopenable", "unreadable"]
    assert set(failures["stage"]) == {"tile"}
    for bad in ("unopenable", "unreadable"):  # the QC picture of a failed slide says why
        assert (results / "qc" / f"{bad}.png").stat().st_size > 1000
    ok = pd.read_csv(results / "cohort_ok.csv", dtype={"slide_id": str})
    assert sorted(ok["slide_id"]) == sorted(HOSTILE)
    for slide in HOSTILE:
        assert (results / "features" / "mobilenet_v2" / f"{slide}.h5").is_file()
        assert (results / "logs" / "tile" / f"{slide}.log").is_file()
        facts = json.loads((results / "tiles" / f"{slide}.json").read_text())
        assert facts["mask_source"] == ("given" if slide == "it's" else "automatic"), slide
        assert json.loads((results / "tiles" / f"{slide}.geojson").read_text())["features"]
    outline = json.loads((results / "tiles" / "unreadable.geojson").read_text())  # a failed slide's stand-in
    assert outline["features"] == [] and outline["pathmil"]["status"] == "failed"
    time.sleep(1)
    square[0][1][0] = 1300  # an edited outline reruns its slide's chain (a touch alone does not: Snakemake
    # compares the checksums of small input files)
    (outlines / "it's.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": square}))
    dry = snakemake(work, "-n", "--configfile", configfile)
    assert job_counts(dry.stdout + dry.stderr) == {
        "tile": 1,
        "extract": 1,
        "batch": 1,
        "collect": 1,
        "qc_gallery": 1,
        "all": 1,
    }
    os.utime(folder / "case 01 (re-scan).tiff")
    dry = snakemake(work, "-n", "--configfile", configfile)
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts == {"tile": 2, "extract": 2, "batch": 1, "collect": 1, "qc_gallery": 1, "all": 1}


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
