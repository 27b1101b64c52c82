"""Probability quality beyond AUC: do predicted probabilities and survival curves mean what they say?

Classification (probabilities of classes):

- the Brier score's decomposition (Murphy, "A new vector partition of the probability score", J. Appl.
  Meteor. 1973) into reliability (calibration; lower is better), resolution (how far the binned outcome
  rates spread around the base rate; higher is better) and uncertainty (the base rate's own variance);
- the expected calibration error with equal-width and with adaptive, equal-mass bins
  (:func:`pathmil.tasks.metrics.expected_calibration_error`);
- the bin-free balance score (Choi, Kim and Lee, "Rethinking evaluation metric for probability estimation
  models using esports data", arXiv:2309.06248, 2023; ../shared/METHODS.md cites it as Kim et al. 2023);
- the data of a reliability diagram.

Survival (predicted survival curves):

- D-calibration (Haider, Hoehn, Davis and Greiner, "Effective ways to build and evaluate individual
  survival distributions", JMLR 2020) with its chi-square test;
- a calibration table at one horizon: mean predicted survival against the Kaplan-Meier estimate in groups
  of predicted survival.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from pathmil.tasks import SurvivalTask, Task
from pathmil.tasks.base import quantile_strata
from pathmil.tasks.metrics import calibration_bins, expected_calibration_error

# ------------------------------------------------------------------------------------- classification


def reliability_table(
    event: np.ndarray, p: np.ndarray, n_bins: int = 10, strategy: str = "uniform"
) -> pd.DataFrame:
    """The reliability diagram of probabilities ``p`` (n,) of binary outcomes ``event`` (n,, 0/1 or bool).

    One row per non-empty bin (:func:`pathmil.tasks.metrics.calibration_bins`: "uniform" equal-width or
    "quantile" equal-mass): ``bin``, ``n``, ``p_min``, ``p_max``, ``mean_predicted`` and ``observed`` (the
    fraction of events).
    """
    event, p = np.asarray(event, float), np.asarray(p, float)
    frame = pd.DataFrame({"bin": calibration_bins(p, n_bins, strategy), "p": p, "event": event})
    table = frame.groupby("bin").agg(
        n=("p", "size"),
        p_min=("p", "min"),
        p_max=("p", "max"),
        mean_predicted=("p", "mean"),
        observed=("event", "mean"),
    )
    return table.reset_index()


def _binary_brier_parts(event: np.ndarray, p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    """(brier, reliability, resolution, uncertainty) of one binary outcome."""
    event, p = np.asarray(event, float), np.asarray(p, float)
    table = reliability_table(event, p, n_bins, strategy)
    weight = table["n"].to_numpy() / len(p)
    base_rate = event.mean()
    reliability = float(np.sum(weight * (table["mean_predicted"] - table["observed"]) ** 2))
    resolution = float(np.sum(weight * (table["observed"] - base_rate) ** 2))
    return np.array([np.mean((p - event) ** 2), reliability, resolution, base_rate * (1 - base_rate)])


def brier_decomposition(
    y_idx: np.ndarray, proba: np.ndarray, n_bins: int = 10, strategy: str = "uniform"
) -> dict[str, float]:
    """Murphy's decomposition of the Brier score: ``brier`` ~ ``reliability`` - ``resolution`` + ``uncertainty``.

    ``y_idx`` holds class indices (n,); ``proba`` is (n, C) or, for a binary problem, (n,) the probability
    of class 1. Binary problems decompose the Brier score of class 1, (p - y)^2 averaged (scikit-learn's
    ``brier_score_loss``, 0-1); multi-class ones the sum over classes of each class's one-vs-rest score
    (0-2), each class decomposed on its own. Probabilities are binned (``n_bins`` bins, equal-width by
    default, see :func:`reliability_table`), with N patients, n_k in bin k, mean probability f_k, event
    rate o_k and base rate o:

        reliability = sum_k n_k (f_k - o_k)^2 / N,  resolution = sum_k n_k (o_k - o)^2 / N,
        uncertainty = o (1 - o).

    The identity is exact when every bin holds one distinct probability; otherwise the binned terms miss
    the within-bin variation (Stephenson et al., Weather Forecast. 2008), returned as ``within_bin`` =
    brier - (reliability - resolution + uncertainty). All NaN without rows.
    """
    proba = np.asarray(proba, float)
    y_idx = np.asarray(y_idx)
    names = ("brier", "reliability", "resolution", "uncertainty", "within_bin")
    if len(y_idx) == 0:
        return dict.fromkeys(names, math.nan)
    if proba.ndim == 1 or proba.shape[1] == 2:
        positive = proba if proba.ndim == 1 else proba[:, 1]
        parts = _binary_brier_parts(y_idx == 1, positive, n_bins, strategy)
    else:
        parts = sum(
            _binary_brier_parts(y_idx == c, proba[:, c], n_bins, strategy) for c in range(proba.shape[1])
        )
    brier, reliability, resolution, uncertainty = (float(v) for v in parts)
    within = brier - (reliability - resolution + uncertainty)
    return dict(zip(names, (brier, reliability, resolution, uncertainty, within)))


def balance_score(y_idx: np.ndarray, proba: np.ndarray) -> float:
    """The bin-free balance score (Choi, Kim and Lee 2023): accuracy minus mean confidence.

    The paper defines it for a binary outcome y with predicted probability p of y = 1 and decision
    y_hat = 1 if p >= 0.5 as the mean over patients of a gain-and-loss term:

        1 - p   if p >= 0.5 and y = 1 (right, confidence p),    p      if p < 0.5 and y = 0 (right),
        -p      if p >= 0.5 and y = 0 (wrong),                  p - 1  if p < 0.5 and y = 1 (wrong),

    that is, 1[right] - confidence with confidence = max(p, 1 - p). Its expectation is 0 for calibrated
    probabilities; negative means over-confident, positive under-confident; it lies in [-1, 0.5]. The
    definition was confirmed from a summary of the paper (the term table and its properties G(p) = 0
    when the prediction equals the true probability, |g(q; p)| = |q - p|), not from the paper's full text.
    Multi-class problems (ours, the same form for the top class): 1[argmax right] - max probability.

    ``y_idx`` holds class indices (n,); ``proba`` is (n, C) or (n,) the probability of class 1. NaN
    without rows.
    """
    proba = np.asarray(proba, float)
    y_idx = np.asarray(y_idx)
    if len(y_idx) == 0:
        return math.nan
    if proba.ndim == 1 or proba.shape[1] == 2:
        p = proba if proba.ndim == 1 else proba[:, 1]
        predicted, confidence = (p >= 0.5).astype(int), np.maximum(p, 1 - p)
    else:
        predicted, confidence = proba.argmax(axis=1), proba.max(axis=1)
    return float(np.mean((predicted == y_idx) - confidence))


def classification_calibration(y_idx: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> dict[str, float]:
    """Brier score and its decomposition, ECE with equal-width and equal-mass bins, balance score."""
    parts = brier_decomposition(y_idx, proba, n_bins)
    return {
        "brier": parts["brier"],
        "brier_reliability": parts["reliability"],
        "brier_resolution": parts["resolution"],
        "brier_uncertainty": parts["uncertainty"],
        "ece": expected_calibration_error(y_idx, proba, n_bins, "uniform"),
        "ece_adaptive": expected_calibration_error(y_idx, proba, n_bins, "quantile"),
        "balance": balance_score(y_idx, proba),
    }


def reliability_pairs(y_idx: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """What a reliability diagram shows: (outcome, probability, what): class 1 and its probability for a
    binary problem, else whether the top class is right and its probability (as pathmil evaluate's plot)."""
    proba = np.asarray(proba, float)
    if proba.ndim == 1:
        proba = np.column_stack([1 - proba, proba])
    if proba.shape[1] == 2:
        return np.asarray(y_idx) == 1, proba[:, 1], "positive class"
    return proba.argmax(axis=1) == np.asarray(y_idx), proba.max(axis=1), "predicted class"


# ------------------------------------------------------------------------------------------- survival


def d_calibration(survival_at_time: np.ndarray, event: np.ndarray, n_bins: int = 10) -> dict[str, object]:
    """D-calibration (Haider et al., JMLR 2020) of predicted survival curves, with its chi-square test.

    ``survival_at_time`` (n,) is each patient's predicted survival probability S_i(t_i) at their own
    follow-up time t_i; ``event`` (n,) whether t_i is an event (else censoring). For calibrated curves
    S_i(T_i) is uniform on [0, 1], so the patients should fill ``n_bins`` equal-width bins of [0, 1]
    equally. A patient with an event adds 1 to the bin holding S_i(t_i). A patient censored at c = S_i(t_i)
    has S_i(T_i) uniform on [0, c]: it adds (c - lo) / c to the bin [lo, hi) holding c and (hi - lo) / c to
    each bin below (1 to the first bin when c = 0). Pearson's chi-square test of the counts against
    n / n_bins each (``scipy.stats.chisquare``, n_bins - 1 degrees of freedom): ``p_value`` >= 0.05 is
    D-calibrated in the paper's sense. Returns ``counts`` (list of n_bins), ``statistic``, ``p_value``,
    ``n``; NaN statistic and p-value without patients.
    """
    s = np.clip(np.asarray(survival_at_time, float), 0.0, 1.0)
    event = np.asarray(event, bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.zeros(n_bins)
    holding = np.minimum((s * n_bins).astype(int), n_bins - 1)  # bin [lo, hi) of S; 1.0 in the last
    np.add.at(counts, holding[event], 1.0)
    for c, b in zip(s[~event], holding[~event]):
        if c <= 0:
            counts[0] += 1.0
            continue
        counts[:b] += (edges[1 : b + 1] - edges[:b]) / c
        counts[b] += (c - edges[b]) / c
    if len(s) == 0:
        return {"counts": counts.tolist(), "statistic": math.nan, "p_value": math.nan, "n": 0}
    test = stats.chisquare(counts)
    return {
        "counts": counts.tolist(),
        "statistic": float(test.statistic),
        "p_value": float(test.pvalue),
        "n": len(s),
    }


def predicted_survival(
    task: Task, test: pd.DataFrame, train: pd.DataFrame | None, times: np.ndarray
) -> np.ndarray | None:
    """Each test row's predicted survival probability at its own time ``times[i]`` (n,), or None when the
    task gives no survival curves (pooled folds with different bins; Cox without training rows).

    Cox: the Breslow curves of :meth:`SurvivalTask.survival_function`. Discrete time (NLL): the model
    gives survival only at the bin edges, a step function of few values whose S_i(T_i) could never be
    uniform, so the curve is interpolated linearly between the points (0, 1), (e_1, S_1), ..., (e_k, S_k)
    at the inner bin edges e_j (events spread evenly within a bin) and, after the last edge, continued to
    zero along the line from (0, 1) through (e_k, S_k). That extrapolation is the one we understand
    Haider et al. to use for curves that end above zero; it is not checked against their code. With one
    bin (no inner edge) the step function is used.
    """
    curve = task.survival_function(test, train)
    if curve is None:
        return None
    times = np.asarray(times, float)
    edges = np.asarray(task.edges, float) if isinstance(task, SurvivalTask) else np.zeros(0)
    if isinstance(task, SurvivalTask) and task.loss_name == "nll" and len(edges) and edges[-1] > 0:
        knots = np.r_[0.0, edges]
        values = curve(knots)  # (n, k + 1); S = 1 at time 0
        inside = np.array([np.interp(t, knots, v) for t, v in zip(times, values)])
        slope = (1.0 - values[:, -1]) / knots[-1]
        beyond = np.clip(1.0 - slope * times, 0.0, None)
        return np.where(times <= knots[-1], inside, beyond)
    return _own_times(curve, times)


def _own_times(curve, times: np.ndarray, chunk: int = 512) -> np.ndarray:
    """S_i(times[i]) from ``curve(times) -> (n, len(times))``, a block of columns at a time (memory n x chunk)."""
    out = np.empty(len(times))
    for start in range(0, len(times), chunk):
        block = curve(times[start : start + chunk])
        rows = np.arange(start, min(start + chunk, len(times)))
        out[rows] = block[rows, rows - start]
    return out


def km_calibration(
    time: np.ndarray, event: np.ndarray, predicted: np.ndarray, horizon: float, n_groups: int = 4
) -> pd.DataFrame:
    """Calibration at one horizon: patients in ``n_groups`` groups of equal size by predicted survival
    ``predicted`` (n,) = S_i(horizon); per group (columns ``group``, ``n``, ``events``, ``predicted``,
    ``observed``, ``observed_low``, ``observed_high``) the mean predicted survival and the Kaplan-Meier
    estimate at the horizon with its 95 % log-log interval (scikit-survival's ``kaplan_meier_estimator``).
    A group whose follow-up ends before the horizon gets its last Kaplan-Meier value.
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    time, event, predicted = np.asarray(time, float), np.asarray(event, bool), np.asarray(predicted, float)
    groups = quantile_strata(predicted, n_groups)
    rows = []
    for g in np.unique(groups):
        member = groups == g
        row = {"group": int(g), "n": int(member.sum()), "events": int(event[member].sum())}
        row["predicted"] = float(predicted[member].mean())
        row["observed"] = row["observed_low"] = row["observed_high"] = math.nan
        if event[member].any():
            t, s, (low, high) = kaplan_meier_estimator(event[member], time[member], conf_type="log-log")
            at = np.searchsorted(t, horizon, side="right") - 1
            values = (1.0, 1.0, 1.0) if at < 0 else (s[at], low[at], high[at])
            row["observed"], row["observed_low"], row["observed_high"] = (float(v) for v in values)
        else:
            row["observed"] = 1.0  # no event in the group: Kaplan-Meier stays at 1
        rows.append(row)
    return pd.DataFrame(rows)
