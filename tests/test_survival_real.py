"""Real data: survival training through `pathmil train` matches a Cox model on GBSG2.

Each patient of the German Breast Cancer Study Group 2 trial (686 patients, scikit-survival's copy) is a
bag of one instance, its standardised clinical feature vector; the MIL pipeline (bag files, splits,
training loop, Cox loss, early stopping) must reach the test c-index of scikit-survival's
CoxPHSurvivalAnalysis on the same split, within 0.03.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from sksurv.datasets import load_gbsg2
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored
from sksurv.preprocessing import OneHotEncoder

from pathmil.cli import main
from pathmil.features.bagfile import write_bag


def test_gbsg2_cox_training_reaches_coxph(tmp_path):
    x, y = load_gbsg2()
    x = OneHotEncoder().fit_transform(x).astype(float)
    event, time = y["cens"].astype(int), y["time"].astype(float)
    ids = [f"G{i:03d}" for i in range(len(x))]
    rng = np.random.default_rng(0)
    test = np.zeros(len(x), bool)
    for e in (0, 1):  # a 30 % test set stratified by event
        members = np.flatnonzero(event == e)
        test[rng.choice(members, round(0.3 * len(members)), replace=False)] = True
    val = np.zeros(len(x), bool)
    val[rng.choice(np.flatnonzero(~test), round(0.15 * (~test).sum()), replace=False)] = True
    train = ~test & ~val
    mean, std = x[train].mean(), x[train].std().replace(0, 1)
    features = ((x - mean) / std).to_numpy(np.float32)
    for i, slide in enumerate(ids):
        write_bag(
            tmp_path / "features" / f"{slide}.h5",
            features[i : i + 1],
            np.zeros((1, 2), np.int64),
            {"patch_size": 1, "patch_level": 0},
            {"encoder": "gbsg2-clinical"},
        )
    pd.DataFrame({"slide_id": ids, "patient_id": ids, "time": time, "event": event}).to_csv(
        tmp_path / "cohort.csv", index=False
    )
    split = np.where(test, "test", np.where(val, "val", "train"))
    pd.DataFrame({"slide_id": ids, "patient_id": ids, "fold": 0, "split": split}).to_csv(
        tmp_path / "splits.csv", index=False
    )

    assert (
        main(
            [
                "train",
                "--features",
                str(tmp_path / "features"),
                "--cohort",
                str(tmp_path / "cohort.csv"),
                "--splits",
                str(tmp_path / "splits.csv"),
                "--fold",
                "0",
                "--task",
                "survival",
                "--aggregator",
                "mean_pool",
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
                "--set",
                "task_options.loss=cox",
                "--set",
                "accumulation=64",
                "--set",
                "lr=3e-3",
                "--set",
                "model.hidden=16",
                "--set",
                "model.dropout=0.1",
                "--set",
                "epochs=60",
                "--set",
                "min_epochs=20",
                "--set",
                "patience=15",
                "--set",
                "warmup_epochs=0",
            ]
        )
        == 0
    )
    ours = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["test"]["c_index"]

    fit_rows = train | val
    cox = CoxPHSurvivalAnalysis().fit(features[fit_rows], y[fit_rows])
    reference = concordance_index_censored(event[test].astype(bool), time[test], cox.predict(features[test]))[
        0
    ]
    assert ours >= reference - 0.03, (ours, reference)
    assert 0.6 < reference < 0.8  # the known range for GBSG2
