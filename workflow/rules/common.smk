# Shared helpers: where outputs go, the cohort table, and settings passed on to `pathmil`.
import json
import os
import shlex

import pandas as pd

from pathmil.cohort import cohort_from_dir, read_table
from pathmil.demo import plan_demo

OUT = f"results/{config['cohort']}"
ENV = "../../envs/pathmil.yaml"
ENCODER = config.get("extract", {}).get("encoder", "resnet50_trunc").replace(":", "-")
FEATURES = f"{OUT}/features/{ENCODER}"
TASKS = (
    list((config.get("tasks") or {}).keys())
    if config["slides"].get("dir") is None
    else []
)
AGGREGATORS = list(config.get("aggregators", ["abmil"]))
FOLDS = list(range(config.get("split", {}).get("folds", 5)))
# MHIM-MIL trains a student whose teacher starts from the plain model of the same fold.
MHIM_BASELINE = {
    "mhim_abmil": "abmil",
    "mhim_abmil_gated": "abmil_gated",
    "mhim_transmil": "transmil",
}


wildcard_constraints:
    slide="[^/]+",
    task="|".join(TASKS) or "none",
    aggregator="[A-Za-z0-9_]+",
    fold=r"\d+",


DEFAULT_TARGETS = {
    "classification": ["label"],
    "survival": ["time", "event"],
    "regression": ["stil"],
}
if config["slides"].get("table"):
    validate_table_columns(
        config["slides"]["table"],
        f"{workflow.basedir}/workflow/schemas/cohort.schema.yaml",
        [
            c
            for t in TASKS
            for c in ((config["tasks"][t] or {}).get("target") or DEFAULT_TARGETS[t])
        ],
    )


def parse_slides():
    """slide_id, path and mpp of every slide, known when the workflow is parsed (so a dry run lists every
    job): the demo's plan, the user's table, or the files of a slide folder."""
    slides = config["slides"]
    if "demo" in slides:
        demo = slides["demo"]
        plan = plan_demo(demo["n_slides"], None, demo["seed"])
        return pd.DataFrame(
            {
                "slide_id": [s.slide_id for s in plan],
                "path": [f"{OUT}/demo/slides/{s.slide_id}.tiff" for s in plan],
                "mpp": [s.table_mpp for s in plan],
            }
        )
    if "table" in slides:
        table = read_table(slides["table"], required=("slide_id", "path"))
        return table if "mpp" in table.columns else table.assign(mpp=None)
    return cohort_from_dir(slides["dir"]).assign(mpp=None)


SLIDES = parse_slides().set_index("slide_id", drop=False)


def slide_ids():
    return SLIDES["slide_id"].tolist()


def slide_row(slide):
    return SLIDES.loc[slide]


def heatmap_slides():
    """The first slides of the cohort (as many as `report.heatmaps`) get heatmaps in the report."""
    return slide_ids()[: (config.get("report") or {}).get("heatmaps", 2)]


def set_args(settings, prefix=""):
    """A settings mapping as `--set key=value` arguments (nested keys dotted), quoted for the shell."""
    args = []
    for key, value in (settings or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            args.append(set_args(value, f"{name}."))
        elif not isinstance(value, dict):
            args.append(f"--set {shlex.quote(f'{name}={json.dumps(value)}')}")
    return " ".join(a for a in args if a)


def all_targets(wildcards):
    """Features of every slide; with tasks, the evaluation of every task x aggregator and the report."""
    targets = [f"{OUT}/cohort_ok.csv"]
    if TASKS:
        targets += [
            f"{OUT}/eval/{t}/{a}/metrics.json" for t in TASKS for a in AGGREGATORS
        ]
        targets += [f"{OUT}/report/summary.csv"]
        targets += [
            f"{OUT}/eval/{t}/{a}/heatmaps/{s}.png"
            for t in TASKS
            for a in AGGREGATORS
            for s in heatmap_slides()
        ]
    return targets


def cohort_source():
    slides = config["slides"]
    if slides.get("demo") is not None:
        return {"table": f"{OUT}/demo/cohort.csv"}
    if slides.get("table"):
        return {"table": slides["table"]}
    return {}


def cohort_source_arg(wildcards, input):
    if "table" in input.keys():
        return f"--cohort {shlex.quote(input.table)}"
    return f"--slide-dir {shlex.quote(config['slides']['dir'])}"


def slide_input(wildcards):
    """The slide file; a missing one is no input but a recorded failure of that slide."""
    path = slide_row(wildcards.slide)["path"]
    return [path] if "demo" in config["slides"] or os.path.exists(path) else []


def slide_mpp_arg(wildcards):
    mpp = slide_row(wildcards.slide).get("mpp")
    return f"--mpp {float(mpp)}" if pd.notna(mpp) else ""


def train_settings(task, aggregator):
    """`train` settings, then the task's own, then the aggregator's (later ones win)."""
    settings = {k: v for k, v in (config.get("train") or {}).items() if k != "gpus"}
    task_config = config["tasks"][task] or {}
    settings.update(task_config.get("train") or {})
    if task_config.get("task_options"):
        settings["task_options"] = task_config["task_options"]
    for key, value in ((config.get("models") or {}).get(aggregator) or {}).items():
        settings[key] = dict(value) if isinstance(value, dict) else value
    return settings


def baseline_checkpoint(wildcards):
    base = MHIM_BASELINE.get(wildcards.aggregator)
    if base is None:
        return []
    return [f"{OUT}/models/{wildcards.task}/{base}/fold{wildcards.fold}/best.pt"]


def train_args(wildcards, input):
    """`--set` arguments of a run, the MHIM teacher's baseline checkpoint, and the label columns."""
    settings = train_settings(wildcards.task, wildcards.aggregator)
    if input.baseline:
        settings.setdefault("mhim", {})["teacher_init"] = input.baseline[0]
    target = config["tasks"][wildcards.task].get("target") or []
    target_arg = (
        f"--target {' '.join(shlex.quote(t) for t in target)}" if target else ""
    )
    return f"{set_args(settings)} {target_arg}"
