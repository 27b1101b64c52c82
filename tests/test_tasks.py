"""The three learning tasks: losses against hand computations, metrics against the libraries' own functions,
fitted state, label checks, and a real survival data set (GBSG2) against scikit-survival's Cox model."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from pathmil.errors import PathmilError
from pathmil.tasks import create_task, task_from_state
from pathmil.tasks.metrics import expected_calibration_error, regression_metrics, survival_metrics
from pathmil.tasks.survival import cox_loss, nll_survival_loss


def survival_table(n: int, seed: int) -> pd.DataFrame:
    """Exponential event times whose rate grows with a hidden risk, uniform censoring, tied times."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    event_time = rng.exponential(50 * np.exp(-risk))
    censor_time = rng.uniform(5, 120, size=n)
    return pd.DataFrame(
        {
            "slide_id": [f"s{i}" for i in range(n)],
            "time": np.round(np.minimum(event_time, censor_time)),  # rounding makes ties
            "event": (event_time <= censor_time).astype(int),
            "risk": risk,
        }
    )


# ------------------------------------------------------------------------------------- survival losses


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_nll_equals_hand_computation():
    logits = torch.tensor([[0.0, 1.0, -1.0]] * 4, dtype=torch.float64)
    h = [sig(0.0), sig(1.0), sig(-1.0)]
    bins = torch.tensor([1, 1, 0, 2])
    events = torch.tensor([1, 0, 1, 0])
    per_bag = [
        -(math.log(1 - h[0]) + math.log(h[1])),  # event in bin 1: survived bin 0, event in bin 1
        -math.log((1 - h[0]) * (1 - h[1])),  # censored in bin 1: survived bins 0 and 1
        -math.log(h[0]),  # event in bin 0
        -math.log((1 - h[0]) * (1 - h[1]) * (1 - h[2])),  # censored in the last bin
    ]
    assert nll_survival_loss(logits, bins, events, alpha=0.0).item() == pytest.approx(np.mean(per_bag))
    # alpha adds weight to the uncensored bags only: (1 - a) L + a L_uncensored
    a = 0.4
    mixed = [per_bag[0], (1 - a) * per_bag[1], per_bag[2], (1 - a) * per_bag[3]]
    assert nll_survival_loss(logits, bins, events, alpha=a).item() == pytest.approx(np.mean(mixed))


def test_nll_clamps_tiny_probabilities():
    logits = torch.tensor([[-40.0, 0.0]], dtype=torch.float64)  # h_0 = 4e-18, below eps
    loss = nll_survival_loss(logits, torch.tensor([0]), torch.tensor([1]), eps=1e-7)
    assert loss.item() == pytest.approx(-math.log(1e-7))


def numpy_cox(eta: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Breslow partial likelihood written the slow, obvious way."""
    terms = [eta[i] - np.log(np.exp(eta[time >= time[i]]).sum()) for i in np.flatnonzero(event)]
    return -float(np.mean(terms))


def test_cox_loss_equals_numpy_with_ties():
    rng = np.random.default_rng(3)
    time = np.array([5.0, 3.0, 3.0, 8.0, 1.0, 3.0, 8.0, 2.0])
    event = np.array([1, 1, 0, 1, 0, 1, 1, 0])
    eta = rng.normal(size=len(time))
    got = cox_loss(torch.tensor(eta), torch.tensor(time), torch.tensor(event))
    assert got.item() == pytest.approx(numpy_cox(eta, time, event), rel=1e-10)
    # the order of the bags in a batch does not matter
    perm = rng.permutation(len(time))
    again = cox_loss(torch.tensor(eta[perm]), torch.tensor(time[perm]), torch.tensor(event[perm]))
    assert again.item() == pytest.approx(got.item(), rel=1e-10)


def test_cox_loss_without_events_is_zero_and_differentiable():
    eta = torch.randn(5, requires_grad=True)
    loss = cox_loss(eta, torch.arange(5.0), torch.zeros(5))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(eta.grad, torch.zeros(5))


def test_the_cox_loss_with_one_bag_per_optimiser_step_is_refused(tmp_path):
    """One bag is its own risk set: the loss is 0 with a zero gradient, so a run would train nothing and
    save its initial weights with exit 0."""
    from pathmil.training.fit import train
    from pathmil.training.run import TrainConfig, check_trainable

    eta = torch.randn(1, requires_grad=True)
    cox_loss(eta, torch.tensor([3.0]), torch.tensor([1.0])).backward()
    assert torch.equal(eta.grad, torch.zeros(1))
    one_bag = TrainConfig.build({"task": "survival", "task_options": {"loss": "cox"}})  # a checkpoint loads
    with pytest.raises(PathmilError, match=r"train\.accumulation 1 gives each step one bag"):
        train(one_bag, tmp_path, tmp_path / "cohort.csv", tmp_path / "splits.csv", 0, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    check_trainable(TrainConfig.build({"task": "survival", "task_options": {"loss": "cox"}, "accumulation": 32}))
    check_trainable(TrainConfig.build({"task": "survival"}))  # the default nll loss trains on one bag per step


# ----------------------------------------------------------------------------------------- survival bins


def test_bins_are_quantiles_of_uncensored_training_times():
    labels = pd.DataFrame({"time": [1, 2, 3, 4, 5, 6, 7, 8, 9, 50, 60, 0.5], "event": [1] * 9 + [0, 0, 0]})
    task = create_task("survival", n_bins=4)
    task.fit(labels)
    expected = np.quantile(np.arange(1, 10), [0.25, 0.5, 0.75])  # censored times play no part
    np.testing.assert_allclose(task.edges, expected)
    assert task.n_outputs == 4
    unseen = pd.DataFrame({"time": [0.0, 2.9, 3.0, 4.5, 5.0, 6.99, 7.0, 1000.0], "event": [1] * 8})
    bins = task.targets(unseen)[:, 0].numpy()
    # bins are [0, e1), [e1, e2), [e2, e3), [e3, inf), as pd.cut(right=False) over open outer edges
    reference = pd.cut(unseen["time"], [-np.inf, *expected, np.inf], right=False, labels=False)
    np.testing.assert_array_equal(bins, reference.to_numpy())
    np.testing.assert_array_equal(bins, [0, 0, 1, 1, 2, 2, 3, 3])


# --------------------------------------------------------------------------------------- survival metrics


@pytest.fixture(scope="module")
def survival_fold():
    """A fitted NLL task and its predictions table for a train/test split of synthetic data."""
    table = survival_table(240, seed=0)
    train, test = table.iloc[:160].copy(), table.iloc[160:].copy()
    task = create_task("survival", loss="nll")
    task.fit(train)
    # logits that follow the hidden risk: hazard logits shifted by it
    for part in (train, test):
        logits = torch.tensor(part["risk"].to_numpy())[:, None] + torch.linspace(-2, 0, task.n_outputs)
        for key, value in task.predict(logits).items():
            part[key] = value
    return task, train, test


def test_c_index_and_td_auc_equal_scikit_survival(survival_fold):
    task, train, test = survival_fold
    # no test event at or after the training horizon, so direct calls of scikit-survival apply unchanged
    assert ((test["time"] < train["time"].max()) | (test["event"] == 0)).all()
    got = task.metrics(test, train)
    from_csv = [pd.read_csv(io.StringIO(part.to_csv(index=False))) for part in (test, train)]
    assert task.metrics(*from_csv) == pytest.approx(got)  # evaluation reads predictions.csv back
    event, time, risk = test["event"].to_numpy(bool), test["time"].to_numpy(), test["score"].to_numpy()
    harrell = concordance_index_censored(event, time, risk)[0]
    assert got["c_index"] == pytest.approx(harrell)
    assert got["c_index"] > 0.65  # the score follows the true risk: a sign error would give < 0.5
    s_train = Surv.from_arrays(train["event"].to_numpy(bool), train["time"].to_numpy())
    s_test = Surv.from_arrays(event, time)
    uno = concordance_index_ipcw(s_train, s_test, risk, tau=train["time"].max())[0]
    assert got["c_index_ipcw"] == pytest.approx(uno)
    curve = task.auc_curve(test, train)
    auc, mean_auc = cumulative_dynamic_auc(s_train, s_test, risk, curve["time"].to_numpy())
    np.testing.assert_allclose(curve["auc"], auc)
    assert got["td_auc"] == pytest.approx(mean_auc)
    # the integrated Brier score of the step survival curve S(t) = S_pad[bin(t)]
    times = curve["time"].to_numpy()
    surv = test[[f"surv_{j}" for j in range(task.n_outputs)]].to_numpy()
    s_pad = np.column_stack([np.ones(len(test)), surv])
    step = s_pad[:, np.searchsorted(task.edges, times, side="right")]
    assert got["ibs"] == pytest.approx(integrated_brier_score(s_train, s_test, step, times))
    reversed_score = task.metrics(test.assign(score=-test["score"]), train)
    assert reversed_score["c_index"] == pytest.approx(1 - got["c_index"], abs=0.01)


def test_survival_metrics_are_nan_when_undefined():
    no_events = survival_metrics(np.array([1.0, 2.0, 3.0]), np.zeros(3, bool), np.array([0.1, 0.2, 0.3]))
    assert all(math.isnan(v) for v in no_events.values())
    one_row = survival_metrics(np.array([1.0]), np.ones(1, bool), np.array([0.1]))
    assert all(math.isnan(v) for v in one_row.values())


def test_late_test_events_are_censored_at_the_training_horizon(survival_fold):
    task, train, test = survival_fold
    late = test.copy()
    late.loc[late.index[0], ["time", "event"]] = [train["time"].max() + 100, 1]
    got = task.metrics(late, train)  # scikit-survival alone would refuse this test set for td-AUC
    assert all(np.isfinite(list(got.values())))


# -------------------------------------------------------------------------------------- classification


def predictions(task, labels: pd.DataFrame, logits: torch.Tensor) -> pd.DataFrame:
    return pd.DataFrame({**task.target_columns(labels), **task.predict(logits)})


def test_binary_classification_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    labels = pd.DataFrame({"label": rng.integers(0, 2, 60)})
    logits = torch.tensor(rng.normal(size=(60, 2))) + torch.tensor(labels["label"].to_numpy())[:, None] * (
        torch.tensor([[0.0, 1.0]])
    )
    task = create_task("classification")
    task.fit(labels)
    table = predictions(task, labels, logits)
    got = task.metrics(table)
    y, p = labels["label"].to_numpy(), torch.softmax(logits, 1)[:, 1].numpy()
    pred = (p > 0.5).astype(int)
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert set(table.columns) == {"target", "score", "prediction"}


def test_multiclass_string_labels_metrics_equal_sklearn():
    rng = np.random.default_rng(2)
    names = np.array(["MESO", "LUAD", "LUSC"])
    labels = pd.DataFrame({"subtype": names[rng.integers(0, 3, 90)]})
    task = create_task("classification", target="subtype")
    task.fit(labels)
    assert task.classes == ["LUAD", "LUSC", "MESO"] and task.n_outputs == 3
    y_idx = np.searchsorted(task.classes, labels["subtype"])
    logits = torch.tensor(rng.normal(size=(90, 3))) + 1.5 * torch.nn.functional.one_hot(
        torch.tensor(y_idx), 3
    )
    table = predictions(task, labels, logits)
    assert {"score_LUAD", "score_LUSC", "score_MESO"} <= set(table.columns)
    got = task.metrics(table)
    assert task.metrics(pd.read_csv(io.StringIO(table.to_csv(index=False)))) == pytest.approx(got)
    proba = torch.softmax(logits, 1).numpy()
    y, pred = labels["subtype"].to_numpy(), np.array(task.classes)[proba.argmax(1)]
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", labels=task.classes))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    one_hot = (y[:, None] == np.array(task.classes)[None]).astype(float)
    assert got["brier"] == pytest.approx(np.mean(((proba - one_hot) ** 2).sum(1)))
    # a fold without MESO: AUC averages the classes present; a single class: NaN, not a crash
    no_meso = table[table["target"] != "MESO"]
    assert got["auc"] != task.metrics(no_meso)["auc"] and np.isfinite(task.metrics(no_meso)["auc"])
    assert math.isnan(task.metrics(table[table["target"] == "LUAD"])["auc"])
    diverged = predictions(task, labels, torch.full((90, 3), float("nan")))
    assert all(math.isnan(v) for v in task.metrics(diverged).values())


def test_expected_calibration_error_by_hand():
    # confidences 0.9 and 0.92 share the bin (13/15, 14/15]: accuracy 0.5 vs confidence 0.91
    proba = np.array([[0.9, 0.1], [0.08, 0.92], [0.3, 0.7], [0.55, 0.45]])
    y = np.array([0, 0, 1, 1])  # right, wrong, right, wrong
    expected = (2 * abs(0.5 - 0.91) + abs(1 - 0.7) + abs(0 - 0.55)) / 4
    assert expected_calibration_error(y, proba) == pytest.approx(expected)
    assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(0.0)


def test_adaptive_expected_calibration_error_by_hand():
    # positive-class probabilities 0.95, 0.85, 0.25, 0.65: top-class confidences 0.95 (right), 0.85
    # (wrong), 0.75 (wrong: predicts 0 for a 1), 0.65 (right)
    p, y = np.array([0.95, 0.85, 0.25, 0.65]), np.array([1, 0, 1, 1])
    # 15 equal-width bins: each alone, (0.05 + 0.85 + 0.75 + 0.35) / 4
    assert expected_calibration_error(y, p, 15) == pytest.approx(0.5)
    # 3 equal-width bins: {0.65} accuracy 1 vs 0.65; {0.75, 0.85, 0.95} accuracy 1/3 vs 0.85
    assert expected_calibration_error(y, p, 3) == pytest.approx(0.25 * 0.35 + 0.75 * (0.85 - 1 / 3))
    # 2 equal-mass bins: {0.65, 0.75} accuracy 0.5 vs 0.70; {0.85, 0.95} accuracy 0.5 vs 0.90
    assert expected_calibration_error(y, p, 2, "quantile") == pytest.approx(0.5 * 0.2 + 0.5 * 0.4)
    with pytest.raises(ValueError, match="binning"):
        expected_calibration_error(y, p, 2, "kmeans")


def test_class_weights_survive_one_bag_batches():
    labels = pd.DataFrame({"label": ["a"] * 6 + ["b"] * 2})
    task = create_task("classification", class_weights="balanced")
    task.fit(labels)
    np.testing.assert_allclose(task.weights, [8 / (2 * 6), 8 / (2 * 2)])
    logits = torch.tensor([[0.3, -0.2]])
    plain = torch.nn.functional.cross_entropy(logits, torch.tensor([1])).item()
    one_b = task.loss(logits, task.targets(labels.iloc[[7]]))
    assert one_b.item() == pytest.approx(2.0 * plain)  # not cancelled by a sum-of-weights normaliser
    with pytest.raises(PathmilError, match="one weight per class"):
        create_task("classification", class_weights=[1.0, 2.0, 3.0]).fit(labels)


# ------------------------------------------------------------------------------------------ regression


def test_regression_scaling_round_trips_and_metrics():
    labels = pd.DataFrame({"stil": [5.0, 10.0, 35.0, 60.0, 80.0, 20.0]})
    task = create_task("regression")
    task.fit(labels)
    assert (task.mean, task.std) == pytest.approx((labels["stil"].mean(), labels["stil"].std(ddof=0)))
    targets = task.targets(labels)
    assert targets.mean().item() == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(task.predict(targets)["score"], labels["stil"], rtol=1e-6)
    assert task.loss(targets, targets).item() == 0.0
    y, p = labels["stil"].to_numpy(), np.array([8.0, 15.0, 30.0, 50.0, 70.0, 20.0])  # same order as y
    got = regression_metrics(y, p, threshold=30)
    assert got["r2"] == pytest.approx(skm.r2_score(y, p))
    assert got["pearson"] == pytest.approx(np.corrcoef(y, p)[0, 1])
    assert got["spearman"] == pytest.approx(1.0)
    assert got["mae"] == pytest.approx(np.abs(y - p).mean())
    assert got["auc_high"] == pytest.approx(skm.roc_auc_score(y >= 30, p))
    assert math.isnan(regression_metrics(y[:2], p[:2])["auc_high"])  # all below 30 %: NaN


# ------------------------------------------------------------------------------ shared behaviour of tasks


TASK_CASES = [
    ("classification", {}, pd.DataFrame({"label": ["LUAD", "LUSC", "MESO", "LUSC", "LUAD", "MESO"] * 2})),
    ("classification", {"class_weights": "balanced"}, pd.DataFrame({"label": [0, 1, 1, 0, 1, 1] * 2})),
    ("survival", {"loss": "nll", "alpha": 0.3}, survival_table(12, seed=5)),
    ("survival", {"loss": "cox"}, survival_table(12, seed=6)),
    ("regression", {"loss": "mse"}, pd.DataFrame({"stil": np.linspace(2, 90, 12)})),
    ("regression", {"loss": "huber", "huber_delta": 0.5}, pd.DataFrame({"stil": np.linspace(2, 90, 12)})),
]


@pytest.mark.parametrize(("name", "settings", "labels"), TASK_CASES)
def test_loss_falls_on_free_logits(name, settings, labels):
    task = create_task(name, **settings)
    task.fit(labels)
    targets = task.targets(labels)
    logits = torch.zeros(len(labels), task.n_outputs, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=0.1)
    losses = []
    for _ in range(60):
        optimiser.zero_grad()
        loss = task.loss(logits, targets)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(("name", "settings", "labels"), TASK_CASES)
def test_losses_take_half_precision_logits_in_float32(name, settings, labels):
    """Mixed-precision training hands bfloat16/float16 logits to the loss; it must not take logs in them."""
    task = create_task(name, **settings)
    task.fit(labels)
    logits = torch.randn(len(labels), task.n_outputs, generator=torch.Generator().manual_seed(2))
    half = task.loss(logits.bfloat16(), task.targets(labels))
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(task.loss(logits.bfloat16().float(), task.targets(labels)).item())


@pytest.mark.parametrize(("name", "settings", "labels"), TASK_CASES)
def test_state_dict_round_trip_reproduces_predict(name, settings, labels):
    task = create_task(name, **settings)
    task.fit(labels)
    logits = torch.randn(5, task.n_outputs, generator=torch.Generator().manual_seed(0))
    state = task.state_dict()
    json.dumps(state)  # plain data: fits in a JSON file or a torch checkpoint
    again = task_from_state(state)
    assert again.n_outputs == task.n_outputs
    for key, value in task.predict(logits).items():
        np.testing.assert_array_equal(again.predict(logits)[key], value)
    torch.testing.assert_close(again.targets(labels), task.targets(labels))
    with pytest.raises(PathmilError, match="differ from the configured"):
        create_task(name, **settings).load_state_dict({**state, "settings": {**state["settings"], "x": 1}})


@pytest.mark.parametrize(("name", "settings", "labels"), TASK_CASES)
def test_main_score_equals_the_main_metric(name, settings, labels):
    """Bootstrap comparisons call main_score instead of metrics: both must give the same number."""
    task = create_task(name, **settings)
    task.fit(labels)
    logits = torch.randn(len(labels), task.n_outputs, generator=torch.Generator().manual_seed(3))
    table = predictions(task, labels, logits)
    expected = task.metrics(table)[task.main_metric]
    assert math.isfinite(expected)
    assert task.main_score(table) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(task.main_score(table.iloc[:1]))  # one bag: undefined, as the metric


@pytest.mark.parametrize(("name", "settings", "labels"), TASK_CASES)
def test_instance_saliency_is_a_probability_per_instance(name, settings, labels):
    task = create_task(name, **settings)
    task.fit(labels)
    logits = torch.randn(2, 7, task.n_outputs, generator=torch.Generator().manual_seed(1))
    saliency = task.instance_saliency(logits)
    assert saliency.shape == (2, 7) and bool(((saliency >= 0) & (saliency <= 1)).all())
    if name != "classification":  # monotone in the risk / the value
        score = torch.tensor(task.predict(logits.reshape(14, -1))["score"]).reshape(2, 7)
        assert torch.equal(saliency.reshape(-1).argsort(), score.reshape(-1).argsort())


def test_stratify_labels():
    survival = create_task("survival").stratify_labels(survival_table(80, seed=1))
    assert set(survival) <= set(range(8)) and len(set(survival)) == 8
    quartiles = create_task("regression").stratify_labels(pd.DataFrame({"stil": np.arange(20.0)}))
    np.testing.assert_array_equal(np.bincount(quartiles), [5, 5, 5, 5])
    classes = create_task("classification").stratify_labels(pd.DataFrame({"label": ["b", "a", "b"]}))
    np.testing.assert_array_equal(classes, [1, 0, 1])


def test_target_renames_label_columns():
    task = create_task("survival", target="os_months,os_dead")
    assert task.label_columns == ["os_months", "os_dead"]
    task.fit(pd.DataFrame({"os_months": [3.0, 5.0, 8.0], "os_dead": [1, 0, 1]}))
    with pytest.raises(PathmilError, match="needs 2 label column"):
        create_task("survival", target="os_months")


@pytest.mark.parametrize(
    ("name", "table", "message"),
    [
        ("classification", {"grade": [1, 2]}, "lack column 'label'.*--target"),
        (
            "classification",
            {"slide_id": ["a", "b"], "label": [1, None]},
            "slide b has no class in column 'label'",
        ),
        ("classification", {"label": ["x", "x"]}, "one class only"),
        (
            "survival",
            {"slide_id": ["a", "b"], "time": [1.0, np.nan], "event": [1, 0]},
            "slide b has no follow-up time",
        ),
        (
            "survival",
            {"slide_id": ["a", "b"], "time": [1.0, -2.0], "event": [1, 0]},
            "slide b: follow-up time .* >= 0",
        ),
        (
            "survival",
            {"slide_id": ["a", "b"], "time": [1.0, 2.0], "event": [1, 2]},
            "slide b: event .* is 2; it must be 1",
        ),
        (
            "survival",
            {"slide_id": ["a", "b"], "time": [1.0, "soon"], "event": [1, 0]},
            "'soon', not a number",
        ),
        ("survival", {"time": [1.0, 2.0], "event": [0, 0]}, "no bag has an event"),
        (
            "regression",
            {"slide_id": ["a", "b"], "stil": [10.0, 120.0]},
            "slide b: value 120 .* outside \\[0, 100\\]",
        ),
        ("regression", {"stil": [10.0, 10.0]}, "same value 10"),
    ],
)
def test_bad_labels_name_the_slide_and_column(name, table, message):
    with pytest.raises(PathmilError, match=message):
        create_task(name).fit(pd.DataFrame(table))


def test_unknown_class_and_unknown_settings():
    task = create_task("classification")
    task.fit(pd.DataFrame({"label": ["a", "b"]}))
    with pytest.raises(PathmilError, match=r"slide s9: class 'c' .* not among the training classes"):
        task.targets(pd.DataFrame({"slide_id": ["s9"], "label": ["c"]}))
    with pytest.raises(PathmilError, match=r"unknown setting task_options\.n_bin; allowed: alpha, eps, loss"):
        create_task("survival", n_bin=4)
    with pytest.raises(PathmilError, match="unknown task 'segmentation'"):
        create_task("segmentation")
    with pytest.raises(PathmilError, match=r"setting task_options\.loss: Input should be 'nll' or 'cox'"):
        create_task("survival", loss="ce")


# ------------------------------------------------------------------------------------ a real data set


def test_gbsg2_cox_and_nll_match_scikit_survival():
    """German Breast Cancer Study Group 2 (686 patients, scikit-survival's copy): the Cox loss fitted by a
    linear model in torch reaches scikit-survival's coefficients and c-index; the discrete-time NLL ranks
    held-out patients as well (within 0.03)."""
    from sklearn.model_selection import train_test_split
    from sksurv.datasets import load_gbsg2
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.preprocessing import OneHotEncoder

    x, y = load_gbsg2()
    x["tgrade"] = x["tgrade"].map(len).astype(int)
    x = OneHotEncoder().fit_transform(x).to_numpy(float)
    x = (x - x.mean(0)) / x.std(0)
    labels = pd.DataFrame({"time": y["time"], "event": y["cens"].astype(int)})

    def fit_linear(task, rows):
        task.fit(labels.iloc[rows])
        model = torch.nn.Linear(x.shape[1], task.n_outputs, bias=task.n_outputs > 1).double()
        torch.nn.init.zeros_(model.weight)
        features, targets = torch.tensor(x[rows]), task.targets(labels.iloc[rows])
        optimiser = torch.optim.LBFGS(model.parameters(), max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            loss = task.loss(model(features), targets)
            loss.backward()
            return loss

        optimiser.step(closure)
        return model

    everyone = np.arange(len(labels))
    reference = CoxPHSurvivalAnalysis(ties="breslow").fit(x, y)
    cox = fit_linear(create_task("survival", loss="cox"), everyone)
    np.testing.assert_allclose(cox.weight.detach().numpy()[0], reference.coef_, atol=1e-3)
    c_ours = concordance_index_censored(y["cens"], y["time"], cox(torch.tensor(x)).detach().numpy()[:, 0])[0]
    c_sksurv = concordance_index_censored(y["cens"], y["time"], reference.predict(x))[0]
    assert c_ours == pytest.approx(c_sksurv, abs=0.01)

    train, test = train_test_split(everyone, test_size=0.3, random_state=0, stratify=y["cens"])
    task = create_task("survival", loss="nll")
    nll = fit_linear(task, train)
    with torch.no_grad():
        table = pd.DataFrame(
            {**task.target_columns(labels.iloc[test]), **task.predict(nll(torch.tensor(x[test])))}
        )
    held_out = CoxPHSurvivalAnalysis().fit(x[train], y[train])
    c_reference = concordance_index_censored(y["cens"][test], y["time"][test], held_out.predict(x[test]))[0]
    assert task.metrics(table)["c_index"] == pytest.approx(c_reference, abs=0.03)
