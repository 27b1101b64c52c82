"""Resampling for confidence intervals: the stratified bootstrap over test bags or patients, and the
bootstrap over runs.

Two kinds of uncertainty, two resamplers (Agarwal et al., "Deep reinforcement learning at the edge of the
statistical precipice", NeurIPS 2021):

- over the test patients, whom a cohort samples: :func:`stratified_resamples` draws each stratum (class,
  or event x follow-up bin) with replacement to its own size, so every resample keeps the case mix and a
  metric such as the AUC or the c-index stays defined, and :func:`grouped_resamples` draws a patient's
  bags together. ``scipy.stats.bootstrap`` has no strata, so this is the one hand-written resampler;
  evaluation, plots and comparisons all use it;
- over the runs (seeds x folds) of one configuration: ``scipy.stats.bootstrap`` with its percentile
  interval, in :func:`iqm_interval` and :func:`pathmil.evaluation.compare.performance_profile`.

Intervals are percentile intervals, the same kind throughout, so they read alike in every table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
from scipy import stats


def stratified_resamples(strata: np.ndarray, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Indices of ``n_resamples`` stratified bootstrap resamples of ``len(strata)`` units.

    Each resample draws, stratum by stratum (in sorted order of the stratum codes), as many units with
    replacement as the stratum holds, and concatenates them: an array of ``len(strata)`` indices into the
    units. The draws come from ``numpy.random.default_rng(seed)``, so a seed gives the same resamples.
    """
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    for _ in range(n_resamples):
        yield np.concatenate([rng.choice(g, len(g), replace=True) for g in groups])


def grouped_resamples(
    strata: np.ndarray, groups: np.ndarray | None, n_resamples: int, seed: int
) -> Iterator[np.ndarray]:
    """Row indices of :func:`stratified_resamples` of the groups (a patient's bags) rather than the rows:
    a group is drawn whole, in the stratum of its first row, since the bags of one patient (several slides
    scored one by one) are not independent. Without groups, or one row per group, the rows themselves
    (the same resamples as :func:`stratified_resamples`)."""
    strata = np.asarray(strata)
    if groups is None or len(np.unique(groups)) == len(groups):
        yield from stratified_resamples(strata, n_resamples, seed)
        return
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    rows = [np.flatnonzero(inverse == g) for g in range(len(first))]
    for draw in stratified_resamples(strata[first], n_resamples, seed):
        yield np.concatenate([rows[g] for g in draw])


def bootstrap_distribution(
    statistic: Callable[[np.ndarray], np.ndarray | float],
    strata: np.ndarray,
    n_resamples: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """``statistic(indices)`` over :func:`grouped_resamples` (``groups``: each row's patient, or None):
    shape (n_resamples, k) for a statistic of k values (k = 1 for a scalar). A statistic that cannot be
    computed on a resample returns NaN."""
    values = [
        np.atleast_1d(np.asarray(statistic(i), float))
        for i in grouped_resamples(strata, groups, n_resamples, seed)
    ]
    return np.vstack(values) if values else np.zeros((0, 1))


def percentile_interval(values: np.ndarray, confidence: float) -> list[float]:
    """The central ``confidence`` percentile interval of bootstrap ``values`` (1-D), NaN draws left out;
    [NaN, NaN] when no draw is finite."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if not len(values):
        return [math.nan, math.nan]
    alpha = (1 - confidence) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50 % (``scipy.stats.trim_mean(values, 0.25)``, as
    Agarwal et al.'s rliable computes it), NaN values left out; robust with few folds and seeds."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(stats.trim_mean(values, 0.25)) if len(values) else math.nan


def iqm_interval(scores: np.ndarray, n_resamples: int, confidence: float, seed: int) -> list[float]:
    """Percentile bootstrap interval of the IQM of per-run ``scores`` (NaN runs left out), resampling the
    runs with ``scipy.stats.bootstrap``. [NaN, NaN] with fewer than two runs or ``n_resamples`` 0.

    The runs (seeds x folds) are resampled as exchangeable: the interval then covers both the training
    randomness (seeds) and the fold-to-fold variation of the test patients. With one seed per fold a
    bootstrap stratified by fold (rliable's) would have nothing to resample.
    """
    scores = np.asarray(scores, float)
    scores = scores[np.isfinite(scores)]
    if len(scores) < 2 or n_resamples <= 0:
        return [math.nan, math.nan]
    result = stats.bootstrap(
        (scores,),
        iqm,
        vectorized=False,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]
