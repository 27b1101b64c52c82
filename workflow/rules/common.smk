# Shared helpers: where outputs go, the cohort table, and settings passed on to `pathmil`.
import json
import os
import shlex

import pandas as pd

OUT = f"results/{config['cohort']}"
ENV = "../../envs/pathmil.yaml"


def cohort_table():
    """The validated cohort table (known once the `cohort` checkpoint has run)."""
    table = checkpoints.cohort.get().output.table
    return pd.read_csv(table, dtype={"slide_id": str, "patient_id": str})


def slide_ids():
    return cohort_table()["slide_id"].tolist()


def slide_row(slide):
    table = cohort_table()
    return table[table["slide_id"] == slide].iloc[0]


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
    """Everything the workflow makes: one tiles facts file per slide, for now."""
    return [f"{OUT}/tiles/{slide}.json" for slide in slide_ids()]
