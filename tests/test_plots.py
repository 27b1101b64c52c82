"""`pathmil evaluate` draws every plot of each task, at the expected size, not blank, titled with CIs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from synthetic import make_synthetic_cohort

from pathmil.cli import main
from pathmil.evaluation.plots import FIGSIZE, PLOTS, PlotData
from pathmil.evaluation.settings import EvaluateConfig, PlotConfig
from pathmil.evaluation.summary import pool_test
from pathmil.training.run import load_run

TINY = ["--set", "epochs=3", "--set", "min_epochs=1", "--set", "model.hidden=16", "--no-progress"]
CASES = {  # name: (task, target columns, extra settings)
    "binary": ("classification", ["label"], []),
    "multiclass": ("classification", ["grade"], []),
    "survival": ("survival", ["time", "event"], ["--set", "task_options.n_bins=3"]),
    "regression": ("regression", ["stil"], []),
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic cohort with a three-class label ``grade`` (terciles of the hidden strength)."""
    root = tmp_path_factory.mktemp("plots")
    features, table = make_synthetic_cohort(root, n_patients=18, extra_slides=4, dim=16)
    frame = pd.read_csv(table, dtype={"slide_id": str, "patient_id": str})
    frame["grade"] = pd.cut(frame["stil"], [-1, 33, 66, 101], labels=["low", "mid", "high"]).astype(str)
    frame.to_csv(table, index=False)
    return features, table


@pytest.fixture(scope="module", params=list(CASES))
def evaluated(request, cohort, tmp_path_factory) -> tuple[str, Path, list[Path]]:
    """Two tiny fold runs of one case, evaluated (with a small bootstrap)."""
    name = request.param
    task, target, extra = CASES[name]
    features, table = cohort
    root = tmp_path_factory.mktemp(name)
    splits = root / "splits.csv"
    common = ["--cohort", str(table), "--task", task, "--target", *target]
    assert main(["split", *common, "--folds", "2", "--out", str(splits)]) == 0
    runs = []
    for fold in (0, 1):
        run = root / f"fold{fold}"
        args = ["train", "--features", str(features), *common, "--splits", str(splits), "--fold", str(fold)]
        assert main([*args, "--out", str(run), *TINY, *extra]) == 0
        runs.append(run)
    out = root / "eval"
    assert main(["evaluate", "--runs", *map(str, runs), "--out", str(out), "--n-bootstrap", "50"]) == 0
    return name, out, runs


def test_every_plot_is_written_listed_sized_and_not_blank(evaluated):
    name, out, _ = evaluated
    task = CASES[name][0]
    listed = json.loads((out / "metrics.json").read_text())["plots"]
    assert listed == [f"plots/{name}" for name in PLOTS[task]]
    dpi = PlotConfig().dpi
    for plot in listed:
        image = cv2.imread(str(out / plot))
        assert image is not None, plot
        panels = (
            3 if name == "multiclass" and plot in ("plots/roc.png", "plots/pr.png") else 1
        )  # one per class
        height = FIGSIZE[1] * (1.25 if plot == "plots/kaplan_meier.png" else 1)  # + the numbers at risk
        assert image.shape[:2] == (round(height * dpi), round(FIGSIZE[0] * dpi * panels)), plot
        assert image.std() > 20, plot  # drawn on, not a blank canvas
        assert (image < 128).mean() > 0.005, plot  # lines and text, not just a background


def test_titles_state_the_metric_with_its_interval_and_axes_are_labelled(evaluated):
    _, out, runs = evaluated
    task = load_run(runs[0]).task
    predictions = pd.concat(
        [pd.read_csv(r / "predictions.csv", dtype={"slide_id": str, "patient_id": str}) for r in runs]
    )
    result = json.loads((out / "metrics.json").read_text())
    test, train = predictions[predictions["split"] == "test"], predictions[predictions["split"] == "train"]
    data = PlotData(
        task=task,
        folds={int(k): rows for k, rows in test.groupby("fold")},
        fold_train={int(k): rows for k, rows in train.groupby("fold")},
        pooled=pool_test(predictions),
        train=train.drop_duplicates("slide_id"),
        metrics={k: (float("nan") if v is None else v) for k, v in result["pooled"].items()},
        ci=result["ci"],
        evaluate=EvaluateConfig(n_bootstrap=50),
        config=PlotConfig(time_unit="days", value_label="sTIL %"),  # the labels come from the config
    )
    for plot, draw in PLOTS[task.name].items():
        figure = draw(data)
        title = figure.get_suptitle()
        # the interval, or a fold-wise metric said to be one (survival's td-AUC: no interval, its folds' values
        # are in metrics_per_fold.csv)
        fold_wise = plot == "time_auc.png" and "mean AUC (mean over 2 folds)" in title
        assert "% CI" in title or "undefined" in title or fold_wise, (plot, title)
        for ax in figure.axes:
            if ax.get_label() == "<colorbar>" or ax.get_title(loc="left") == "number at risk":
                continue
            assert ax.get_xlabel() or ax.get_ylabel(), plot
        assert any(ax.lines or ax.collections for ax in figure.axes), plot
        if task.name == "survival":
            assert figure.axes[0].get_xlabel() == "time (days)"
            data.config = PlotConfig()  # without a unit the axis names the column, never a guessed unit
            assert draw(data).axes[0].get_xlabel() == "time (column time)"
            data.config = PlotConfig(time_unit="days", value_label="sTIL %")
        if plot == "kaplan_meier.png":
            assert "log-rank p" in title and "c-index (mean over 2 folds)" in title, title
            at_risk = figure.axes[1]
            assert at_risk.get_title(loc="left") == "number at risk"
            counts = {(round(text.get_position()[0], 6), round(text.get_position()[1])): int(text.get_text())
                      for text in at_risk.texts}  # fmt: skip
            time = data.pooled["time"].to_numpy()
            high = np.zeros(len(data.pooled), bool)  # above the median of its own fold's test bags
            for _, rows in data.pooled.groupby("fold"):
                high[rows.index] = rows["score"] > rows["score"].median()
            assert 0 < high.sum() < len(high)
            for (x, row), n in counts.items():  # row 0: low risk, row 1: high risk; bags followed to x
                group = high if row == 1 else ~high
                assert n == int((time[group] >= x).sum()), (x, row)
            assert {n for (x, _), n in counts.items() if x == 0} == {int((~high).sum()), int(high.sum())}
        if plot == "scatter.png":
            assert figure.axes[0].get_xlabel() == "true sTIL %"
            assert figure.axes[0].get_ylabel() == "predicted sTIL %"
