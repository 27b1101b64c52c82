"""Plain metric functions: arrays in, numbers out (scikit-survival's style), one per task.

Every number comes from scikit-learn, SciPy or scikit-survival; this module only chooses the arguments
(positive class, evaluation times, truncation) and turns "cannot be computed" into NaN. A metric is NaN,
never an exception, when the data cannot define it: one class in the test set, no events, fewer than two
rows, no comparable pair. Callers (early stopping, bootstrap CIs) must therefore expect NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

NAN = float("nan")

# Quantiles of the test follow-up times at which time-dependent AUC and the Brier score are evaluated:
# the 10th to 90th percentile avoids the first and last times, where few subjects are cases or at risk.
EVAL_QUANTILES = np.linspace(0.1, 0.9, 17)


def _safe(fn: Callable[[], Any]) -> float:
    """``float(fn())``, or NaN when the data cannot define the metric (scikit-learn/-survival raise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined-metric and constant-input warnings: the NaN says it
        try:
            value = float(fn())
        except (ValueError, ZeroDivisionError, FloatingPointError):
            return NAN
    return value if math.isfinite(value) else NAN


# ------------------------------------------------------------------------------------- classification


def class_indices(y_true: Sequence[Any], classes: Sequence[Any]) -> np.ndarray:
    """Positions of ``y_true`` in ``classes``; a label outside ``classes`` is a ``ValueError``."""
    lookup = {c: i for i, c in enumerate(classes)}
    try:
        return np.array([lookup[v] for v in y_true], dtype=np.int64)
    except KeyError as err:
        raise ValueError(f"label {err.args[0]!r} is not one of the classes {list(classes)}") from None


CALIBRATION_BINNING = ("uniform", "quantile")


def calibration_bins(p: np.ndarray, n_bins: int, strategy: str = "uniform") -> np.ndarray:
    """The bin (0 .. n_bins - 1) of each probability in ``p``.

    "uniform": ``n_bins`` equal-width bins (lo, hi] of [0, 1], the first closed at 0 (Guo et al. 2017).
    "quantile": adaptive, equal-mass bins (Nixon et al., "Measuring calibration in deep learning", CVPR
    Workshops 2019): the probabilities sorted (stably) and cut into ``n_bins`` runs of equal size (sizes
    differ by at most one), so tied probabilities may fall into neighbouring bins. Fewer probabilities
    than bins give one bin each. A ``strategy`` outside :data:`CALIBRATION_BINNING` is a ``ValueError``.
    """
    p = np.asarray(p, dtype=float)
    if strategy == "uniform":
        inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
        return np.searchsorted(inner_edges, p, side="left")  # bin b holds (edge_b, edge_b+1]
    if strategy == "quantile":
        bins = np.empty(len(p), dtype=np.int64)
        for b, members in enumerate(
            np.array_split(np.argsort(p, kind="stable"), min(n_bins, max(len(p), 1)))
        ):
            bins[members] = b
        return bins
    raise ValueError(f"calibration binning must be one of {CALIBRATION_BINNING}, got {strategy!r}")


def expected_calibration_error(
    y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15, strategy: str = "uniform"
) -> float:
    """Expected calibration error of the top-class confidence (Guo et al., ICML 2017).

    ``y_true`` holds class indices, ``proba`` is (n, C) (or (n,), the positive-class probability of a
    binary problem). Confidences fall in ``n_bins`` bins (:func:`calibration_bins`: equal-width by
    default, or adaptive equal-mass with ``strategy="quantile"``); the ECE is the mean over bins of
    |accuracy - mean confidence| weighted by the fraction of samples in the bin.
    """
    proba = np.asarray(proba, dtype=float)
    if proba.ndim == 1:
        proba = np.column_stack([1 - proba, proba])
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return NAN
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    bins = calibration_bins(confidence, n_bins, strategy)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def multiclass_auc(y_idx: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes present in ``y_idx`` (binary: the plain AUC of class 1).

    With every class present this equals ``roc_auc_score(y, proba, multi_class="ovr", average="macro")``;
    a class missing from a small test fold is left out of the average instead of making the AUC undefined.
    """
    present = np.unique(y_idx)
    if len(present) < 2:
        return NAN
    if proba.shape[1] == 2:
        return _safe(lambda: skm.roc_auc_score(y_idx, proba[:, 1]))
    return _safe(lambda: np.mean([skm.roc_auc_score(y_idx == c, proba[:, c]) for c in present]))


def classification_metrics(
    y_true: Sequence[Any], proba: np.ndarray, classes: Sequence[Any]
) -> dict[str, float]:
    """AUC, balanced accuracy, F1, accuracy, Brier score and ECE of class probabilities.

    ``proba`` is (n, C) with columns in the order of ``classes``; ``y_true`` holds labels from ``classes``.
    Binary problems (C = 2) use class ``classes[1]`` as the positive class for AUC and F1; multi-class ones
    use macro averages. The Brier score is scikit-learn's: the mean squared error of the positive-class
    probability for binary problems (0-1) and the sum over classes for multi-class ones (0-2).
    """
    proba = np.asarray(proba, dtype=float)
    n_classes = len(classes)
    y_idx = class_indices(y_true, classes)
    if len(y_idx) == 0 or not np.isfinite(proba).all():  # no rows, or a diverged model
        return dict.fromkeys(("auc", "balanced_accuracy", "f1", "accuracy", "brier", "ece"), NAN)
    pred = proba.argmax(axis=1)
    labels = list(range(n_classes))
    binary = n_classes == 2
    return {
        "auc": multiclass_auc(y_idx, proba),
        "balanced_accuracy": _safe(lambda: skm.balanced_accuracy_score(y_idx, pred)),
        "f1": _safe(
            lambda: skm.f1_score(
                y_idx, pred, labels=labels, average="binary" if binary else "macro", zero_division=0.0
            )
        ),
        "accuracy": _safe(lambda: skm.accuracy_score(y_idx, pred)),
        "brier": _safe(lambda: skm.brier_score_loss(y_idx, proba[:, 1] if binary else proba, labels=labels)),
        "ece": expected_calibration_error(y_idx, proba),
    }


# ------------------------------------------------------------------------------------------- survival


def evaluation_times(test_time: np.ndarray, horizon: float) -> np.ndarray:
    """Times for time-dependent AUC and the Brier score: test-time quantiles inside both follow-ups.

    scikit-survival needs them within [min, max) of the test times and below the end of the training
    follow-up (``horizon``), where the censoring distribution is still positive.
    """
    times = np.unique(np.quantile(test_time, EVAL_QUANTILES))
    return times[(times >= test_time.min()) & (times < min(test_time.max(), horizon))]


def _censor_at(time: np.ndarray, event: np.ndarray, horizon: float) -> np.ndarray:
    """The test outcomes administratively censored at ``horizon`` (the end of the training follow-up).

    The censoring distribution is estimated on the training rows, so scikit-survival refuses test events
    after the last training time. At evaluation times below ``horizon`` such a subject is a control (still
    event-free) whether it is censored at ``horizon`` or not, so the metrics are unchanged.
    """
    from sksurv.util import Surv  # scikit-survival is imported only where survival is evaluated

    late = time >= horizon
    return Surv.from_arrays(event & ~late, np.minimum(time, horizon))


def time_dependent_auc(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None,
    times: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Cumulative/dynamic AUC (Uno et al. 2007; Hung and Chiang 2010) of a risk score: (times, auc, mean).

    scikit-survival's ``cumulative_dynamic_auc`` with the censoring distribution from the training rows
    (the test rows themselves when none are given); ``times`` default to :func:`evaluation_times`. The
    mean is scikit-survival's, weighted by the Kaplan-Meier estimate over the time range. Returns empty
    arrays and NaN when the data cannot define it.
    """
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    time, event, risk = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk, float)
    if train_time is None or train_event is None:
        train_time, train_event = time, event
    train_time, train_event = np.asarray(train_time, float), np.asarray(train_event, bool)
    empty = (np.zeros(0), np.zeros(0), NAN)
    if len(time) < 2 or not event.any() or not train_event.any():
        return empty
    horizon = float(train_time.max())
    test = _censor_at(time, event, horizon)
    if times is None:
        times = evaluation_times(test["time"], horizon)
    if len(times) == 0:
        return empty
    train = Surv.from_arrays(train_event, train_time)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            auc, mean_auc = cumulative_dynamic_auc(train, test, risk, times)
        except ValueError:
            return empty
    return np.asarray(times, float), np.asarray(auc, float), float(mean_auc)


def harrell_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index of a risk score (higher = worse prognosis), scikit-survival's
    ``concordance_index_censored``; NaN with fewer than two rows, no event or no comparable pair."""
    from sksurv.metrics import concordance_index_censored

    time, event, risk = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk, float)
    if len(time) < 2 or not event.any():
        return NAN
    return _safe(lambda: concordance_index_censored(event, time, risk)[0])


def survival_metrics(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None,
    survival: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
    """Harrell's and Uno's c-index, mean time-dependent AUC and integrated Brier score of a risk score.

    ``risk`` is higher for worse prognosis. The IPCW metrics estimate the censoring distribution on the
    training rows (``train_time``, ``train_event``; without them, on the test rows); Uno's c-index is
    truncated at the end of the training follow-up. ``survival(times) -> (n, len(times))`` gives each test
    row's survival probabilities for the integrated Brier score; without it, ``ibs`` is NaN.
    """
    from sksurv.metrics import concordance_index_ipcw, integrated_brier_score
    from sksurv.util import Surv

    time, event, risk = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk, float)
    out = {"c_index": NAN, "c_index_ipcw": NAN, "td_auc": NAN, "ibs": NAN}
    if len(time) < 2 or not event.any():
        return out
    out["c_index"] = harrell_c_index(time, event, risk)
    if train_time is None or train_event is None:
        train_time, train_event = time, event
    train_time, train_event = np.asarray(train_time, float), np.asarray(train_event, bool)
    train = Surv.from_arrays(train_event, train_time)
    horizon = float(train_time.max())
    out["c_index_ipcw"] = _safe(
        lambda: concordance_index_ipcw(train, Surv.from_arrays(event, time), risk, tau=horizon)[0]
    )
    times, _, out["td_auc"] = time_dependent_auc(time, event, risk, train_time, train_event)
    if survival is not None and len(times) >= 2:
        test = _censor_at(time, event, horizon)
        out["ibs"] = _safe(lambda: integrated_brier_score(train, test, survival(times), times))
    return out


# ----------------------------------------------------------------------------------------- regression


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, threshold: float = 30.0) -> dict[str, float]:
    """R^2, Pearson and Spearman correlation, MAE, RMSE, and the AUC of ``y_true >= threshold`` from ``y_pred``.

    The AUC is WeakSTIL's sTIL-high vs sTIL-low evaluation (Schirris et al., SPIE MI 2022): how well the
    predicted value ranks slides above the clinical cut-off (30 % by default) over those below it.
    """
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    if len(y_true) == 0:
        return dict.fromkeys(("r2", "pearson", "spearman", "mae", "rmse", "auc_high"), NAN)
    enough = len(y_true) >= 2
    high = y_true >= threshold
    return {
        "r2": _safe(lambda: skm.r2_score(y_true, y_pred)) if enough else NAN,
        "pearson": _safe(lambda: stats.pearsonr(y_true, y_pred).statistic) if enough else NAN,
        "spearman": _safe(lambda: stats.spearmanr(y_true, y_pred).statistic) if enough else NAN,
        "mae": _safe(lambda: skm.mean_absolute_error(y_true, y_pred)),
        "rmse": _safe(lambda: skm.root_mean_squared_error(y_true, y_pred)),
        "auc_high": _safe(lambda: skm.roc_auc_score(high, y_pred)) if 0 < high.sum() < len(high) else NAN,
    }
