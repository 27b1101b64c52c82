"""Paired comparisons and calibration: the statistics against known answers and hand computations, and
`pathmil compare` on synthetic run folders written as `pathmil train` writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from pathmil.cli import main
from pathmil.errors import PathmilError
from pathmil.evaluation import calibration
from pathmil.evaluation.bootstrap import grouped_resamples, iqm, iqm_interval, stratified_resamples
from pathmil.evaluation.compare import (
    compare_runs,
    paired_bootstrap,
    performance_profile,
    probability_of_improvement,
    verdict,
)
from pathmil.evaluation.settings import EvaluateConfig
from pathmil.models.checkpoint import save_checkpoint
from pathmil.tasks import create_task
from pathmil.tasks.metrics import classification_metrics

FAST = EvaluateConfig(n_bootstrap=50)

# --------------------------------------------------------------------------------- resampling


def test_stratified_resamples_keep_each_stratum_and_repeat_with_the_seed():
    strata = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    draws = list(stratified_resamples(strata, 20, seed=3))
    for index in draws:
        assert len(index) == len(strata)
        assert np.array_equal(np.sort(strata[index]), np.sort(strata))  # stratum sizes kept
    assert any(len(np.unique(i)) < len(strata) for i in draws)  # with replacement
    again = list(stratified_resamples(strata, 20, seed=3))
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))


def test_a_patients_slides_are_resampled_together_and_widen_the_interval():
    """Several slides of one patient are not independent bags: evaluate's CI resamples patients, so 16
    patients with 6 near-identical slides each get the interval of 16 patients, not of 96 bags."""
    from pathmil.evaluation.summary import bootstrap_ci

    patients = np.repeat(np.arange(16), 6)
    draws = list(grouped_resamples(np.repeat(np.arange(16) % 2, 6), patients, 30, seed=1))
    for index in draws:  # whole patients, each stratum's count of patients kept
        drawn = patients[index]
        assert all((drawn == p).sum() % 6 == 0 for p in np.unique(drawn)) and len(index) == 96
        assert np.bincount(drawn % 2).tolist() == [48, 48]
    one_each = np.arange(10)  # one row per group: the rows' own resamples
    assert all(
        np.array_equal(a, b)
        for a, b in zip(grouped_resamples(one_each % 2, one_each, 5, 2), stratified_resamples(one_each % 2, 5, 2))
    )

    rng = np.random.default_rng(0)
    label = np.arange(16) % 2
    strength = rng.normal(label * 1.0, 1.0)  # each patient's score, shared by its slides
    test = pd.DataFrame({
        "slide_id": [f"s{i}" for i in range(96)], "patient_id": [f"p{p}" for p in patients],
        "target": np.repeat(label, 6), "score": np.repeat(strength, 6) + rng.normal(0, 0.05, 96),
    })  # fmt: skip
    task = create_task("classification")
    task.fit(test.rename(columns={"target": "label"}))
    config = EvaluateConfig(n_bootstrap=300)
    ours = bootstrap_ci(task, test, None, config)["auc"]
    as_bags = bootstrap_ci(task, test.drop(columns="patient_id"), None, config)["auc"]
    assert ours[1] - ours[0] > 1.8 * (as_bags[1] - as_bags[0])


def mean_of(values: np.ndarray):
    return lambda idx: float(values[idx].mean())


def test_paired_bootstrap_of_a_constant_shift_gives_that_shift_with_a_zero_width_interval():
    rng = np.random.default_rng(0)
    b = rng.normal(size=80)
    a = b + 0.1  # every patient scores 0.1 higher under A
    strata = (b > 0).astype(int)
    point, draws = paired_bootstrap([mean_of(a), mean_of(b)], strata, 200, seed=1)
    difference = draws[:, 0] - draws[:, 1]
    assert point[0] - point[1] == pytest.approx(0.1)
    np.testing.assert_allclose(difference, 0.1)  # paired: the shift in every replicate
    # unpaired, each configuration's own interval is wide and the two overlap
    a_low, a_high = np.quantile(draws[:, 0], [0.025, 0.975])
    b_high = np.quantile(draws[:, 1], 0.975)
    assert a_high - a_low > 0.2 and a_low < b_high


def test_paired_bootstrap_of_identical_scores_is_centred_on_zero():
    values = np.random.default_rng(1).normal(size=50)
    point, draws = paired_bootstrap([mean_of(values), mean_of(values.copy())], np.zeros(50), 100, seed=2)
    assert point[0] == point[1]
    assert np.all(draws[:, 0] - draws[:, 1] == 0)
    assert verdict("a", "b", "survival", 0.0, [0.0, 0.0], 0.5).startswith("a vs b on survival: no detectable")


# ------------------------------------------------------------------------------- over runs


def test_probability_of_improvement_by_hand():
    shift = {0: np.array([0.7, 0.8, 0.75]), 1: np.array([0.6, 0.65, 0.7])}
    better = {k: v + 0.2 for k, v in shift.items()}
    assert probability_of_improvement(better, shift) == 1.0
    assert probability_of_improvement(shift, better) == 0.0
    assert probability_of_improvement(shift, shift) == 0.5  # every pair ties, or is mirrored
    # fold 0: pairs (0.7, 0.7) tie 0.5, (0.7, 0.6) 1, (0.8, 0.7) 1, (0.8, 0.6) 1 -> 3.5 / 4; fold 1: 0
    x = {0: np.array([0.7, 0.8]), 1: np.array([0.5]), 2: np.array([0.9])}
    y = {0: np.array([0.7, 0.6]), 1: np.array([0.9])}  # fold 2 only in x: left out
    assert probability_of_improvement(x, y) == pytest.approx((3.5 / 4 + 0.0) / 2)
    assert math.isnan(probability_of_improvement({0: np.array([np.nan])}, {0: np.array([0.5])}))


def test_iqm_and_its_interval():
    scores = np.array([8.0, 1, 7, 2, 6, 3, 5, 4])  # middle half: 3, 4, 5, 6
    assert iqm(scores) == 4.5
    assert iqm(np.r_[scores, np.nan]) == 4.5
    low, high = iqm_interval(scores, 500, 0.95, seed=0)
    assert 1 <= low < 4.5 < high <= 8
    assert iqm_interval(np.full(6, 0.8), 200, 0.95, seed=0) == pytest.approx([0.8, 0.8])
    assert all(math.isnan(v) for v in iqm_interval(np.array([0.8]), 200, 0.95, seed=0))


def test_performance_profile_counts_runs_strictly_above_each_threshold():
    profile = performance_profile(np.array([0.6, 0.7, 0.8]), np.array([0.5, 0.65, 0.75, 0.8]), 200, 0.95, 0)
    np.testing.assert_allclose(profile["share"], [1, 2 / 3, 1 / 3, 0])
    assert (profile["low"] <= profile["share"]).all() and (profile["share"] <= profile["high"]).all()
    assert profile["low"].iloc[0] == 1.0  # every resample of runs all above 0.5


def test_verdict_names_the_winner_first_only_when_the_interval_excludes_zero():
    assert (
        verdict("mambamil", "abmil", "survival", 0.04, [0.01, 0.07], 0.91)
        == "mambamil > abmil on survival: +0.040 [0.010, 0.070], P(improvement) 0.91"
    )
    assert (
        verdict("abmil", "mambamil", "survival", -0.04, [-0.07, -0.01], 0.09)
        == "mambamil > abmil on survival: +0.040 [0.010, 0.070], P(improvement) 0.91"
    )
    assert "no detectable difference" in verdict("a", "b", "survival", 0.04, [-0.01, 0.07], 0.8)


# ----------------------------------------------------------------------------- calibration


def test_brier_decomposition_by_hand():
    # two forecast values, so the decomposition is exact: base rate 3/5
    p, y = np.array([0.25, 0.25, 0.75, 0.75, 0.75]), np.array([0, 1, 1, 1, 0])
    parts = calibration.brier_decomposition(y, p)
    # bin 0.25: 2 patients, rate 1/2; bin 0.75: 3 patients, rate 2/3
    assert parts["reliability"] == pytest.approx((2 * (0.25 - 0.5) ** 2 + 3 * (0.75 - 2 / 3) ** 2) / 5)
    assert parts["resolution"] == pytest.approx((2 * (0.5 - 0.6) ** 2 + 3 * (2 / 3 - 0.6) ** 2) / 5)
    assert parts["uncertainty"] == pytest.approx(0.6 * 0.4)
    assert parts["brier"] == pytest.approx((3 * 0.0625 + 2 * 0.5625) / 5)  # = 0.2625
    assert parts["within_bin"] == pytest.approx(0.0, abs=1e-12)


def test_brier_score_matches_the_task_metric_binary_and_multiclass():
    rng = np.random.default_rng(4)
    for n_classes in (2, 3):
        proba = rng.dirichlet(np.ones(n_classes), size=40)
        y = rng.integers(0, n_classes, 40)
        parts = calibration.brier_decomposition(y, proba)
        assert parts["brier"] == pytest.approx(
            classification_metrics(y, proba, list(range(n_classes)))["brier"]
        )
        terms = parts["reliability"] - parts["resolution"] + parts["uncertainty"] + parts["within_bin"]
        assert terms == pytest.approx(parts["brier"])


def test_balance_score_by_hand():
    # 0.9 & 1: 1 - 0.9 = 0.1; 0.2 & 0: 0.2; 0.6 & 0: -0.6; 0.3 & 1: -1 + 0.3 = -0.7
    p, y = np.array([0.9, 0.2, 0.6, 0.3]), np.array([1, 0, 0, 1])
    assert calibration.balance_score(y, p) == pytest.approx((0.1 + 0.2 - 0.6 - 0.7) / 4)
    assert calibration.balance_score(y, np.column_stack([1 - p, p])) == pytest.approx(-0.25)
    # p = 0.5 decides class 1 (the paper's p >= 0.5): right for y = 1 (+0.5), wrong for y = 0 (-0.5)
    assert calibration.balance_score(np.array([1]), np.array([0.5])) == pytest.approx(0.5)
    assert calibration.balance_score(np.array([0]), np.array([0.5])) == pytest.approx(-0.5)
    # multi-class, top class: right at 0.7 -> 0.3; wrong at 0.5 -> -0.5
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    assert calibration.balance_score(np.array([0, 2]), proba) == pytest.approx(-0.1)


def test_balance_score_is_near_zero_for_calibrated_and_negative_for_overconfident_probabilities():
    rng = np.random.default_rng(5)
    p = rng.uniform(size=20000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    assert abs(calibration.balance_score(y, p)) < 0.01
    sharpened = np.where(p > 0.5, 1 - (1 - p) / 2, p / 2)  # more extreme than the truth
    assert calibration.balance_score(y, sharpened) < -0.1


def test_reliability_table_and_expected_calibration_error_agree():
    rng = np.random.default_rng(6)
    p = rng.uniform(size=200)
    y = rng.uniform(size=200) < p
    for strategy in ("uniform", "quantile"):
        table = calibration.reliability_table(y, p, 10, strategy)
        assert table["n"].sum() == 200
        if strategy == "quantile":
            assert set(table["n"]) == {20}
        # for probabilities above 0.5 everywhere, the top-class ECE is the positive-class one
        top = np.maximum(p, 1 - p)
        right = (p >= 0.5) == y
        from_table = calibration.reliability_table(right, top, 10, strategy)
        ece = float(
            (from_table["n"] * (from_table["observed"] - from_table["mean_predicted"]).abs()).sum() / 200
        )
        assert ece == pytest.approx(
            calibration.classification_calibration(y.astype(int), p)[
                f"ece{'' if strategy == 'uniform' else '_adaptive'}"
            ]
        )


def test_d_calibration_counts_by_hand():
    # an event at S = 0.95 (bin 9); a censoring at S = 0.5: uniform on [0, 0.5], 0.2 to each of bins 0-4
    result = calibration.d_calibration(np.array([0.95, 0.5]), np.array([True, False]))
    np.testing.assert_allclose(result["counts"], [0.2] * 5 + [0.0] * 4 + [1.0])
    assert result["n"] == 2
    censored_at_zero = calibration.d_calibration(np.array([0.0]), np.array([False]))
    assert censored_at_zero["counts"][0] == 1.0


def exponential_cohort(n: int, seed: int, truth_factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted S_i(t) = exp(-rate_i t); true times drawn with rate truth_factor x rate_i; uniform
    censoring. Returns (time, event, predicted survival at the observed time)."""
    rng = np.random.default_rng(seed)
    rate = np.exp(rng.normal(size=n))
    true_time = rng.exponential(1 / (truth_factor * rate))
    censor = rng.uniform(0, 3, size=n)
    time = np.minimum(true_time, censor)
    return time, true_time <= censor, np.exp(-rate * time)


def test_d_calibration_passes_on_the_predicted_distribution_and_fails_when_miscalibrated():
    _, event, survival = exponential_cohort(2000, seed=7, truth_factor=1.0)
    assert 0.2 < event.mean() < 0.9  # censoring in play
    calibrated = calibration.d_calibration(survival, event)
    assert calibrated["p_value"] > 0.05
    counts = np.array(calibrated["counts"])
    assert counts.sum() == pytest.approx(2000) and np.abs(counts / 200 - 1).max() < 0.15
    _, event, survival = exponential_cohort(2000, seed=7, truth_factor=2.0)  # events come twice as fast
    assert calibration.d_calibration(survival, event)["p_value"] < 1e-6


def test_discrete_time_curves_are_interpolated_between_bin_edges():
    task = create_task("survival", n_bins=3)
    task.fit(pd.DataFrame({"time": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0], "event": [1] * 6}))
    task.edges = np.array([1.0, 2.0])  # bins [0, 1), [1, 2), [2, inf)
    test = pd.DataFrame({"time": [0.5, 1.5, 3.0, 5.0], "event": 1, "score": -1.6})
    test[["surv_0", "surv_1", "surv_2"]] = [0.8, 0.5, 0.3]  # survival at 1 and 2 (and after the last bin)
    got = calibration.predicted_survival(task, test, None, test["time"].to_numpy())
    # (0, 1) -> (1, 0.8) -> (2, 0.5), then the line from (0, 1) through (2, 0.5): 1 - 0.25 t, down to 0
    np.testing.assert_allclose(got, [0.9, 0.65, 0.25, 0.0])


def test_kaplan_meier_calibration_without_censoring_is_the_survivors_share():
    time = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    predicted = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    table = calibration.km_calibration(time, np.ones(8, bool), predicted, horizon=4.5, n_groups=2)
    assert table["n"].tolist() == [4, 4]
    assert table["predicted"].tolist() == pytest.approx([0.25, 0.75])
    assert table["observed"].tolist() == pytest.approx([0.0, 1.0])  # times 1-4 all died by 4.5, 5-8 alive


# ----------------------------------------------------------------------- `pathmil compare`


def synthetic_cohort(task_name: str, n: int = 48, seed: int = 0) -> pd.DataFrame:
    """Patients with a hidden strength that drives the label; 3 folds."""
    rng = np.random.default_rng(seed)
    strength = rng.normal(size=n)
    ids = [f"p{i:03d}" for i in range(n)]
    frame = pd.DataFrame({"slide_id": ids, "patient_id": ids, "strength": strength, "fold": np.arange(n) % 3})
    if task_name == "classification":
        frame["label"] = (strength + rng.normal(scale=0.7, size=n) > 0).astype(int)
    else:  # survival
        event_time = np.exp(2 - 0.8 * strength + rng.normal(scale=0.5, size=n))
        censor = rng.uniform(2, 30, n)
        frame["time"], frame["event"] = np.minimum(event_time, censor), (event_time <= censor).astype(int)
    return frame


def write_runs(
    root: Path,
    frame: pd.DataFrame,
    task_name: str,
    encoder: str,
    aggregator: str,
    quality: float,
    seeds=(0, 1),
    noise: int = 0,
    fold_shift: float = 0.0,
) -> None:
    """Run folders as `pathmil train` leaves them (best.pt with config and fitted task, metrics.json,
    predictions.csv of train and test bags), in folders whose names say nothing of the configuration."""
    for seed in seeds:
        for fold in sorted(frame["fold"].unique()):
            rng = np.random.default_rng([noise, seed, int(fold)])
            task = create_task(task_name, **({"n_bins": 3} if task_name == "survival" else {}))
            task.fit(frame[frame["fold"] != fold])
            tables = []
            for split, rows in (
                ("train", frame[frame["fold"] != fold]),
                ("test", frame[frame["fold"] == fold]),
            ):
                signal = quality * rows["strength"].to_numpy() + rng.normal(size=len(rows))
                if task_name == "classification":
                    logits = np.column_stack([-signal / 2, signal / 2])
                else:
                    shift = fold_shift * fold  # each fold model on its own risk scale
                    logits = np.repeat((0.8 * signal - 1.0 + shift)[:, None], task.n_outputs, axis=1)
                table = rows[["slide_id", "patient_id"]].assign(fold=fold, split=split)
                table = table.assign(**task.target_columns(rows), **task.predict(torch.tensor(logits)))
                tables.append(table)
            out = root / f"run_{encoder[:2]}{aggregator[:2]}{seed}{fold}"
            out.mkdir(parents=True)
            pd.concat(tables).to_csv(out / "predictions.csv", index=False)
            config = {
                "task": task_name,
                "aggregator": aggregator,
                "seed": seed,
                "task_options": task.settings(),
            }
            save_checkpoint(
                out / "best.pt",
                {
                    "config": config,
                    "task": task.state_dict(),
                    "model": {},
                    "aggregator": aggregator,
                    "in_dim": 8,
                },
            )
            metrics = {
                "task": task_name,
                "aggregator": aggregator,
                "fold": int(fold),
                "features": {"encoder": encoder},
            }
            (out / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def classification_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    frame = synthetic_cohort("classification")
    write_runs(root, frame, "classification", "uni", "abmil", quality=0.5)
    write_runs(root, frame, "classification", "uni", "mambamil", quality=3.0, noise=1)
    return root


def test_compare_command_writes_tables_verdicts_and_plots(classification_runs, tmp_path):
    out = tmp_path / "cmp"
    assert (
        main(["compare", "--runs", str(classification_runs), "--out", str(out), "--n-bootstrap", "60"]) == 0
    )
    table = pd.read_csv(out / "comparison.csv").set_index("configuration")
    assert sorted(table.index) == ["abmil", "mambamil"]  # one encoder: labelled by aggregator
    assert (table[["n_seeds", "n_folds", "n_runs", "n_patients"]].loc["abmil"].tolist()) == [2, 3, 6, 48]
    assert table.loc["mambamil", "value"] > table.loc["abmil", "value"]
    for name in ("ece", "ece_adaptive", "balance", "brier_reliability", "brier_resolution"):
        assert table[name].notna().all()
    assert (table["ci_low"] <= table["value"]).all() and (table["value"] <= table["ci_high"]).all()

    pairs = pd.read_csv(out / "pairs.csv").set_index(["a", "b"])
    forward, backward = pairs.loc[("mambamil", "abmil")], pairs.loc[("abmil", "mambamil")]
    assert forward["difference"] == pytest.approx(-backward["difference"])
    assert forward["p_improvement"] == pytest.approx(1 - backward["p_improvement"])
    assert forward["significant"] and forward["ci_low"] > 0
    verdicts = (out / "verdicts.txt").read_text().splitlines()
    assert len(verdicts) == 1 and verdicts[0].startswith("mambamil > abmil on classification: +")

    result = json.loads((out / "comparison.json").read_text())
    assert set(result["profiles"]) == {"abmil", "mambamil"}
    assert len(result["runs"]["abmil"]) == 6
    for plot in ("performance_profile.png", "differences.png", "calibration.png"):
        assert (out / "plots" / plot).stat().st_size > 20_000
    assert result["plots"] == [
        f"plots/{p}" for p in ("performance_profile.png", "differences.png", "calibration.png")
    ]

    # the report's page: the called difference in green in the matrix, its verdict, the profile inline
    page = (out / "comparison.html").read_text(encoding="ascii")
    assert page.count('<td class="better">') == 1 and page.count('<td class="worse">') == 1
    assert f"<b>{forward['difference']:+.3f}</b>" in page and "P(row &gt; column)" in page
    assert '<li class="called">mambamil &gt; abmil on classification: +' in page
    assert page.count('src="data:image/png;base64,') == 1 and "48 patients" in page


def test_mean_over_seeds_of_the_pooled_auc_and_fold_wise_probability_of_improvement(
    classification_runs, tmp_path
):
    """The numbers of the table recomputed from the run folders with scikit-learn."""
    result = compare_runs([classification_runs], tmp_path, FAST)
    rows = {r["configuration"]: r for r in result["configurations"]}
    per_run, pooled = {}, {}
    for run in sorted(classification_runs.iterdir()):
        info = json.loads((run / "metrics.json").read_text())
        seed = torch.load(run / "best.pt", weights_only=True)["config"]["seed"]
        test = pd.read_csv(run / "predictions.csv").query("split == 'test'")
        per_run.setdefault(info["aggregator"], {}).setdefault(info["fold"], []).append(
            skm.roc_auc_score(test["target"], test["score"])
        )
        pooled.setdefault(info["aggregator"], {}).setdefault(seed, []).append(test)
    for name, seeds in pooled.items():
        aucs = [skm.roc_auc_score(*pd.concat(t)[["target", "score"]].T.to_numpy()) for t in seeds.values()]
        assert rows[name]["value"] == pytest.approx(np.mean(aucs))
        assert rows[name]["iqm"] == pytest.approx(iqm(np.concatenate(list(per_run[name].values()))))
    expected = np.mean(
        [
            np.mean([[x > y or 0.5 * (x == y) for y in per_run["abmil"][f]] for x in per_run["mambamil"][f]])
            for f in per_run["abmil"]
        ]
    )
    pair = next(p for p in result["pairs"] if p["a"] == "mambamil")
    assert pair["p_improvement"] == pytest.approx(expected)


def test_identical_configurations_show_no_difference(tmp_path):
    frame = synthetic_cohort("classification")
    write_runs(tmp_path / "runs", frame, "classification", "uni", "abmil", quality=1.0)
    write_runs(tmp_path / "runs", frame, "classification", "uni", "transmil", quality=1.0)  # same noise
    result = compare_runs([tmp_path / "runs"], tmp_path / "out", FAST)
    pair = result["pairs"][0]
    assert pair["difference"] == 0 and pair["ci_low"] == 0 and pair["ci_high"] == 0
    assert pair["p_improvement"] == 0.5 and not pair["significant"]
    assert "no detectable difference" in result["verdicts"][0]
    page = (tmp_path / "out" / "comparison.html").read_text(encoding="ascii")
    assert 'class="better"' not in page and 'class="worse"' not in page and 'class="called"' not in page


def test_compare_survival_with_encoders_and_aggregators(tmp_path):
    frame = synthetic_cohort("survival", n=60)
    for encoder, aggregator, quality, noise in (
        ("uni", "abmil", 1.0, 0),
        ("resnet", "abmil", 1.0, 1),
        ("uni", "mambamil", 2.5, 2),
    ):
        write_runs(
            tmp_path / "runs", frame, "survival", encoder, aggregator, quality, seeds=(0,), noise=noise
        )
    result = compare_runs([tmp_path / "runs"], tmp_path / "out", FAST)
    rows = {r["configuration"]: r for r in result["configurations"]}
    assert set(rows) == {"uni/abmil", "resnet/abmil", "uni/mambamil"}
    assert result["main_metric"] == "c_index" and result["horizon"] == pytest.approx(np.median(frame["time"]))
    for row in rows.values():
        assert 0 <= row["d_calibration_p"] <= 1 and row["d_calibration_chi2"] >= 0
        assert math.isfinite(row["iqm_low"])  # 3 folds: 3 runs to resample
    diagram = result["calibration"]["uni/mambamil"]
    assert sum(g["n"] for g in diagram["table"]) == 60
    assert sum(diagram["d_calibration"]["counts"]) == pytest.approx(60)
    assert (tmp_path / "out" / "plots" / "calibration.png").is_file()


def test_survival_is_compared_on_the_folds_c_indices_not_on_pooled_risks(tmp_path):
    """Fold models that each order their patients well, on risk scales far apart: the pooled c-index mixes
    the scales, the comparison's statistic is the mean of the folds' c-indices (scikit-survival's)."""
    from sksurv.metrics import concordance_index_censored

    frame = synthetic_cohort("survival", n=60)
    write_runs(tmp_path / "runs", frame, "survival", "uni", "abmil", 2.0, seeds=(0,), fold_shift=6.0)
    write_runs(tmp_path / "runs", frame, "survival", "uni", "mambamil", 2.0, seeds=(0,), noise=1)
    result = compare_runs([tmp_path / "runs"], tmp_path / "out", FAST)
    assert result["statistic"] == "mean over folds"
    rows = {r["configuration"]: r for r in result["configurations"]}
    tests = pd.concat(
        pd.read_csv(run / "predictions.csv").query("split == 'test'") for run in (tmp_path / "runs").iterdir()
        if json.loads((run / "metrics.json").read_text())["aggregator"] == "abmil"
    )  # fmt: skip

    def c_index(table):
        return concordance_index_censored(table["event"].astype(bool), table["time"], table["score"])[0]

    per_fold = np.mean([c_index(part) for _, part in tests.groupby("fold")])
    assert rows["abmil"]["value"] == pytest.approx(per_fold, abs=1e-9)
    assert c_index(tests) < per_fold - 0.1  # pooled, the shifted scales lose the order
    pair = next(p for p in result["pairs"] if p["a"] == "abmil")
    assert not pair["significant"]  # equally good models, whatever their scales
    page = (tmp_path / "out" / "comparison.html").read_text(encoding="ascii")
    assert "c-index (mean over 3 folds, CI)" in page


def test_a_fixed_test_set_is_labelled_pooled_by_compare_as_by_evaluate(tmp_path):
    """Every fold scores the same held-out test set: the bags' risks are averaged over the folds (one
    group), so the statistic is not a mean over folds, and compare says "pooled" as evaluate does."""
    from pathmil.evaluation.summary import evaluate_runs

    frame = synthetic_cohort("survival", n=45)
    for aggregator, noise in (("abmil", 0), ("mambamil", 1)):
        write_runs(tmp_path / "runs", frame, "survival", "uni", aggregator, 2.0, seeds=(0,), noise=noise)
    runs = sorted((tmp_path / "runs").iterdir())
    fixed = pd.read_csv(runs[0] / "predictions.csv").query("split == 'test'")  # fold 0's test bags
    for run in runs:
        table = pd.read_csv(run / "predictions.csv")
        fold = int(table["fold"].iloc[0])
        train = table[(table["split"] == "train") & ~table["slide_id"].isin(fixed["slide_id"])]
        pd.concat([train, fixed.assign(fold=fold)]).to_csv(run / "predictions.csv", index=False)
    result = compare_runs([tmp_path / "runs"], tmp_path / "out", FAST)
    abmil = [r for r in runs if json.loads((r / "metrics.json").read_text())["aggregator"] == "abmil"]
    evaluated = evaluate_runs(abmil, tmp_path / "eval", FAST)
    assert result["statistic"] == evaluated["statistic"] == "pooled"
    assert "c-index (pooled, CI)" in (tmp_path / "out" / "comparison.html").read_text(encoding="ascii")


@pytest.mark.parametrize(("n", "quality"), [(60, 2.0), (30, 4.0)])
def test_evaluate_reports_survival_ranking_metrics_as_the_mean_over_folds(tmp_path, n, quality):
    """`pathmil evaluate` on fold models with risk scales far apart: the c-index it reports (and the report
    and the plots show) is the mean of the folds' c-indices, with an interval around it, as compare's;
    the pooled risks' c-index would be far lower. The integrated Brier score (survival probabilities,
    one scale) stays pooled. With 10 patients a fold and a strong model (the demo's case) the interval
    still holds the estimate."""
    from sksurv.metrics import concordance_index_censored

    from pathmil.evaluation.summary import evaluate_runs

    frame = synthetic_cohort("survival", n=n)
    write_runs(tmp_path / "runs", frame, "survival", "uni", "abmil", quality, seeds=(0,), fold_shift=6.0)
    runs = sorted((tmp_path / "runs").iterdir())
    result = evaluate_runs(runs, tmp_path / "eval", EvaluateConfig(n_bootstrap=200))
    rows = {r["metric"]: r for r in result["summary"]}
    tests = pd.concat(pd.read_csv(run / "predictions.csv").query("split == 'test'") for run in runs)

    def c_index(table):
        return concordance_index_censored(table["event"].astype(bool), table["time"], table["score"])[0]

    per_fold = np.mean([c_index(part) for _, part in tests.groupby("fold")])
    assert result["statistic"] == rows["c_index"]["statistic"] == "mean over folds"
    assert rows["c_index"]["pooled"] == pytest.approx(per_fold, abs=1e-9)
    assert per_fold > c_index(tests) + 0.1  # the pooled risks lose the order
    assert rows["c_index"]["ci_low"] < per_fold < rows["c_index"]["ci_high"]
    assert rows["td_auc"]["statistic"] == "mean over folds" and rows["ibs"]["statistic"] == "pooled"
    assert math.isfinite(rows["ibs"]["ci_low"])
    table = pd.read_csv(tmp_path / "eval" / "metrics_summary.csv").set_index("metric")
    assert table.loc["c_index", "statistic"] == "mean over folds"


def test_a_fold_whose_c_index_is_undefined_is_left_out_and_the_statistic_says_so(tmp_path, caplog, capsys):
    """A fold whose test part holds no event has no comparable pair: its c-index is NaN. The mean over
    folds leaves it out, and every place a person reads it (evaluate's CLI, summary, report; compare's
    page) says "mean over 2 of 3 folds" (a warning names the fold), never "mean over folds" of all."""
    from pathmil.evaluation.report import statistic_label, summary_page
    from pathmil.evaluation.summary import evaluate_runs

    frame = synthetic_cohort("survival", n=60)
    frame.loc[frame["fold"] == 1, "event"] = 0  # fold 1: every test patient censored
    write_runs(tmp_path / "runs", frame, "survival", "uni", "abmil", 2.0, seeds=(0,))
    runs = sorted((tmp_path / "runs").iterdir())
    with caplog.at_level("WARNING", logger="pathmil.evaluation.summary"):
        result = evaluate_runs(runs, tmp_path / "eval", EvaluateConfig(n_bootstrap=50))
    per_fold = pd.DataFrame(result["per_fold"]).set_index("fold")
    assert np.isnan(per_fold.loc[1, "c_index"]) and per_fold["c_index"].notna().sum() == 2
    rows = {r["metric"]: r for r in result["summary"]}
    assert rows["c_index"]["folds"] == 2 and result["folds"] == 3
    assert rows["c_index"]["pooled"] == pytest.approx(per_fold["c_index"].dropna().mean(), abs=1e-12)
    assert rows["ibs"]["folds"] == 3  # pooled: every fold's bags
    assert "c_index is undefined in fold 1" in caplog.text and "mean over 2 of 3 folds" in caplog.text
    assert statistic_label("mean over folds", 2, 3) == "mean over 2 of 3 folds"
    assert statistic_label("mean over folds", 3, 3) == "mean over 3 folds"
    assert statistic_label("pooled", 3, 3) == "pooled"
    table = pd.read_csv(tmp_path / "eval" / "metrics_summary.csv").set_index("metric")
    assert table.loc["c_index", "folds"] == 2
    assert "survival/abmil: the mean over 2 of 3 folds" in summary_page([tmp_path / "eval"])
    assert statistic_label("mean over folds", None, 3) == "mean over folds"  # an evaluation without the count
    caplog.clear()
    write_runs(tmp_path / "runs", frame, "survival", "uni", "mambamil", 2.0, seeds=(0,), noise=1)
    with caplog.at_level("WARNING", logger="pathmil.evaluation.compare"):
        compared = compare_runs([tmp_path / "runs"], tmp_path / "compared", FAST)
    assert compared["statistic"] == "mean over folds" and (compared["folds_used"], compared["folds"]) == (2, 3)
    assert "c_index is undefined in fold 1" in caplog.text
    assert "c-index (mean over 2 of 3 folds, CI)" in (tmp_path / "compared" / "comparison.html").read_text()
    capsys.readouterr()
    main(["evaluate", "--runs", *map(str, runs), "--out", str(tmp_path / "cli"), "--n-bootstrap", "20"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("c_index:"))
    assert "mean over 2 of 3 folds" in line


def test_runs_of_other_patients_tasks_or_twice_are_refused(tmp_path, classification_runs, capsys):
    other = synthetic_cohort("classification", n=45, seed=1)
    write_runs(tmp_path / "other", other, "classification", "uni", "transmil", quality=1.0)
    with pytest.raises(PathmilError, match="tests other bags"):
        compare_runs([classification_runs, tmp_path / "other"], tmp_path / "out", FAST)
    survival = synthetic_cohort("survival", n=48)
    write_runs(tmp_path / "surv", survival, "survival", "uni", "abmil", quality=1.0, seeds=(0,))
    assert (
        main(
            [
                "compare",
                "--runs",
                str(classification_runs),
                str(tmp_path / "surv"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "several tasks" in capsys.readouterr().err
    copy = tmp_path / "copy"
    copy.mkdir()
    first = sorted(classification_runs.iterdir())[0]
    for name in ("best.pt", "metrics.json", "predictions.csv"):
        (copy / name).write_bytes((first / name).read_bytes())
    with pytest.raises(PathmilError, match="twice"):
        compare_runs([classification_runs, copy], tmp_path / "out", FAST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PathmilError, match="no training runs"):
        compare_runs([tmp_path / "empty"], tmp_path / "out", FAST)
    with pytest.raises(PathmilError, match="neither"):
        compare_runs([tmp_path / "missing"], tmp_path / "out", FAST)
