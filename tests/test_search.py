"""Hyperparameter search inside a fold: nested (the test part is never read), resumable, reproducible."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from synthetic import make_synthetic_cohort

from pathmil.cli import main
from pathmil.errors import PathmilError
from pathmil.training.run import TrainConfig
from pathmil.training.search import SearchConfig, applicable

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = {"train": {"epochs": 4, "min_epochs": 2, "patience": 2, "model": {"hidden": 32}}}
SPACE = {"search": {"n_trials": 3, "space": {"lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
                                             "model.dropout": {"type": "float", "low": 0.0, "high": 0.4}}}}  # fmt: skip


@pytest.fixture(scope="module")
def fold(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("search")
    features, table = make_synthetic_cohort(root, n_patients=30, extra_slides=0)
    splits = root / "splits.csv"
    assert main(["split", "--cohort", str(table), "--task", "classification", "--folds", "3", "--val-frac",
                 "0.3", "--out", str(splits)]) == 0  # fmt: skip
    settings = root / "train.yaml"
    settings.write_text(yaml.safe_dump({**BASE, **SPACE}))
    return {"root": root, "features": features, "table": table, "splits": splits, "settings": settings}


def search(fold: dict[str, Path], out: Path, *extra: str, features: Path | None = None) -> int:
    return main([
        "search", "--features", str(features or fold["features"]), "--cohort", str(fold["table"]),
        "--splits", str(fold["splits"]), "--fold", "0", "--config", str(fold["settings"]), "--out", str(out), *extra,
    ])  # fmt: skip


def test_the_search_never_reads_the_test_part(fold, tmp_path):
    """The fold's test bags are replaced by garbage: the search must not notice (it never opens them), and
    the best settings it finds then train the final model, which does read them."""
    damaged = tmp_path / "features"
    shutil.copytree(fold["features"], damaged)
    splits = pd.read_csv(fold["splits"], dtype={"slide_id": str})
    test = splits[(splits["fold"] == 0) & (splits["split"] == "test")]["slide_id"]
    for slide in test:
        (damaged / f"{slide}.h5").write_bytes(b"not an HDF5 file")
    assert search(fold, tmp_path / "s", features=damaged) == 0
    best = yaml.safe_load((tmp_path / "s" / "best.yaml").read_text())["train"]
    assert (
        set(best) == {"lr", "model"} and 1e-4 <= best["lr"] <= 3e-3 and 0 <= best["model"]["dropout"] <= 0.4
    )
    trials = pd.read_csv(tmp_path / "s" / "trials.csv")
    assert len(trials) == 3 and (trials["state"] == "COMPLETE").all()
    run = ["train", "--features", str(fold["features"]), "--cohort", str(fold["table"]), "--splits",
           str(fold["splits"]), "--fold", "0", "--config", str(fold["settings"]), "--config",
           str(tmp_path / "s" / "best.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    assert main(run) == 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["lr"] == best["lr"] and config["model"]["dropout"] == best["model"]["dropout"]
    assert config["epochs"] == 4  # the base settings stay under the searched ones
    damaged_run = [*run[:2], str(damaged), *run[3:-3], "--out", str(tmp_path / "bad"), "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "pathmil", *damaged_run], capture_output=True, text=True)
    assert done.returncode != 0  # the final model does read the test part, and fails on the garbage


def test_a_search_resumes_and_repeats(fold, tmp_path):
    assert search(fold, tmp_path / "a", "--n-trials", "2") == 0
    assert len(pd.read_csv(tmp_path / "a" / "trials.csv")) == 2
    assert search(fold, tmp_path / "a") == 0  # tops the study up to search.n_trials = 3
    assert len(pd.read_csv(tmp_path / "a" / "trials.csv")) == 3
    assert search(fold, tmp_path / "b") == 0
    first, second = (yaml.safe_load((tmp_path / r / "best.yaml").read_text()) for r in ("a", "b"))
    assert first == second  # a seeded sampler: the same search finds the same settings


def test_the_space_keeps_what_the_aggregator_reads():
    space = SearchConfig().space
    abmil = applicable(space, TrainConfig(aggregator="abmil"))
    assert (
        "lr" in abmil
        and "model.dropout" in abmil
        and "mhim.high_ratio" not in abmil
        and "model.sr_rate" not in abmil
    )
    assert "mhim.high_ratio" in applicable(space, TrainConfig(aggregator="mhim_abmil"))
    assert "model.sr_rate" in applicable(space, TrainConfig(aggregator="mambamil"))
    bad = SearchConfig.build({"space": {"lrr": {"type": "float", "low": 1, "high": 2}}})
    with pytest.raises(PathmilError, match="unknown train setting 'lrr'"):
        applicable(bad.space, TrainConfig())
