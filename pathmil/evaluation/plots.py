"""The plots people read results from, written by ``pathmil evaluate`` beside its metrics.

- classification: ROC and precision-recall curves of every fold's test bags and of the pooled test bags
  (one panel per class, one-vs-rest, when there are more than two classes) and a reliability diagram
  (calibration; Guo et al., "On calibration of modern neural networks", ICML 2017);
- survival: Kaplan-Meier curves of the predicted low- and high-risk halves of the pooled test bags (split
  at the median risk) with the log-rank p-value (scikit-survival's ``compare_survival``), and the
  time-dependent AUC over follow-up time (Uno et al. 2007; Hung and Chiang 2010);
- regression: predicted against true values with the identity line, and the ROC of sTIL-high against
  sTIL-low at the task's threshold (WeakSTIL, Schirris et al., SPIE MI 2022).

Every title states the pooled metric with its bootstrap confidence interval from the evaluation; the
average precision, which is not among the task's metrics, gets its own stratified bootstrap here. Figures
use matplotlib's object interface with the Agg canvas (no pyplot state, no display) at a fixed size:
:data:`FIGSIZE` inches per panel at ``PlotConfig.dpi``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from pathmil.evaluation.bootstrap import bootstrap_distribution, percentile_interval
from pathmil.evaluation.settings import EvaluateConfig, PlotConfig
from pathmil.evaluation.summary import patient_groups
from pathmil.fileio import atomic_output
from pathmil.tasks import Task
from pathmil.tasks.classification import class_key
from pathmil.tasks.metrics import class_indices

FIGSIZE = (6.0, 5.0)  # inches of one panel
POOLED = {"color": "black", "linewidth": 2.0}
FOLD = {"linewidth": 1.0, "alpha": 0.7}
CHANCE = {"color": "grey", "linestyle": "--", "linewidth": 0.8}


@dataclass
class PlotData:
    """What the plots draw on: test rows per fold and pooled, training rows, the pooled metrics."""

    task: Task
    folds: dict[int, pd.DataFrame]  # test rows of each fold
    fold_train: dict[int, pd.DataFrame]  # training rows of each fold
    pooled: pd.DataFrame  # one row per test bag (the mean score where folds share a test set)
    train: pd.DataFrame  # the training rows of all folds, one per bag
    metrics: dict[str, float]
    ci: dict[str, list[float]]
    evaluate: EvaluateConfig
    config: PlotConfig
    statistics: dict[str, str] = field(default_factory=dict)  # metric: "mean over 5 folds" ...

    @property
    def separate_folds(self) -> bool:
        """Whether the pooled bags are the folds' own test sets (not one fixed test set scored by all)."""
        return self.pooled["fold"].nunique() > 1

    def with_ci(self, name: str, metric: str) -> str:
        """``AUC 0.912 (95 % CI 0.851-0.960)`` from evaluate's metrics and their bootstrap CI; a metric of
        the task's ``fold_wise_metrics`` is the mean over the folds (``c-index (mean over 5 folds) 0.712
        (95 % CI ...)``; ``mean over 4 of 5 folds`` where a fold's value is undefined)."""
        if metric in self.task.fold_wise_metrics and self.separate_folds:
            statistic = self.statistics.get(metric, f"mean over {self.pooled['fold'].nunique()} folds")
            name = f"{name} ({statistic})"
        return format_ci(name, self.metrics.get(metric, math.nan), self.ci.get(metric), self.evaluate)

    def figure(self, panels: int = 1) -> Figure:
        return Figure(figsize=(FIGSIZE[0] * panels, FIGSIZE[1]), dpi=self.config.dpi, layout="constrained")


def title(fig: Figure, *lines: str) -> None:
    """The figure's title, one statement per line (long titles would be cut at the figure's edge)."""
    fig.suptitle("\n".join(lines), fontsize="medium")


def format_ci(name: str, value: float, ci: list[float] | None, evaluate: EvaluateConfig) -> str:
    if value is None or not math.isfinite(value):
        return f"{name} undefined"
    text = f"{name} {value:.3f}"
    if ci and all(v is not None and math.isfinite(v) for v in ci):
        text += f" ({100 * evaluate.confidence:g} % CI {ci[0]:.3f}-{ci[1]:.3f})"
    return text


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    strata: np.ndarray,
    evaluate: EvaluateConfig,
    groups: np.ndarray | None = None,
) -> list[float] | None:
    """Percentile interval of ``statistic(rows)`` over stratified resamples of the rows, a patient's rows
    together where ``groups`` names them (as evaluate's)."""
    if evaluate.n_bootstrap <= 0:
        return None
    values = bootstrap_distribution(statistic, strata, evaluate.n_bootstrap, evaluate.seed, groups)[:, 0]
    if not np.isfinite(values).any():
        return None
    return percentile_interval(values, evaluate.confidence)


def fold_colour(index: int) -> str:
    return f"C{index % 10}"


def finish(ax, xlabel: str, ylabel: str, unit_square: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if unit_square:
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def no_data(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)


# ------------------------------------------------------------------------------------- classification


def class_problems(
    data: PlotData,
) -> list[tuple[str, Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]]]]:
    """(name, rows -> (is the class, its probability)) per panel: the positive class of a binary task,
    every class against the rest otherwise."""
    task = data.task
    classes = task.classes

    def index(rows: pd.DataFrame) -> np.ndarray:
        return class_indices([class_key(v) for v in rows["target"]], classes)

    def problem(c: int) -> Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]]:
        return lambda rows: (index(rows) == c, task.probabilities(rows)[:, c])

    if len(classes) == 2:
        return [(f"positive class {classes[1]}", problem(1))]
    return [(f"class {c} vs rest", problem(i)) for i, c in enumerate(classes)]


def both_classes(y: np.ndarray) -> bool:
    return 0 < int(np.sum(y)) < len(y)


def curve_plot(data: PlotData, kind: str) -> Figure:
    """ROC (``kind`` "roc") or precision-recall ("pr") curves: each fold thin, the pooled bags thick."""
    problems = class_problems(data)
    fig = data.figure(len(problems))
    axes = fig.subplots(1, len(problems), squeeze=False)[0]
    for ax, (name, split) in zip(axes, problems):
        series = [(f"fold {k}", rows, {**FOLD, "color": fold_colour(k)}) for k, rows in data.folds.items()]
        for label, rows, style in [*series, ("pooled", data.pooled, POOLED)]:
            y, p = split(rows)
            if not both_classes(y):
                continue
            if kind == "roc":
                fpr, tpr, _ = skm.roc_curve(y, p)
                ax.plot(fpr, tpr, label=f"{label} (AUC {skm.roc_auc_score(y, p):.2f})", **style)
            else:
                precision, recall, _ = skm.precision_recall_curve(y, p)
                ap = skm.average_precision_score(y, p)
                ax.plot(recall, precision, drawstyle="steps-post", label=f"{label} (AP {ap:.2f})", **style)
        y, _ = split(data.pooled)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], **CHANCE)
            finish(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)")
        else:
            ax.axhline(float(np.mean(y)) if len(y) else 0.0, **CHANCE, label="prevalence")
            finish(ax, "recall (sensitivity)", "precision (positive predictive value)")
        ax.set_title(name, fontsize="medium")
    if kind == "roc":
        metric = data.with_ci("AUC" if len(problems) == 1 else "macro AUC", "auc")
        title(fig, f"ROC, test bags of {len(data.folds)} fold(s)", metric)
    else:
        title(fig, f"Precision-recall, test bags of {len(data.folds)} fold(s)", average_precision(data))
    return fig


def average_precision(data: PlotData) -> str:
    """The pooled (macro) average precision with its stratified bootstrap interval, as title text."""
    problems = class_problems(data)
    pairs = [split(data.pooled) for _, split in problems]

    def statistic(index: np.ndarray) -> float:
        values = [skm.average_precision_score(y[index], p[index]) for y, p in pairs if both_classes(y[index])]
        return float(np.mean(values)) if values else math.nan

    strata = np.argmax(np.column_stack([y for y, _ in pairs]), axis=1) if len(pairs) > 1 else pairs[0][0]
    value = statistic(np.arange(len(data.pooled)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interval = bootstrap_interval(statistic, np.asarray(strata), data.evaluate, patient_groups(data.pooled))
    return format_ci("AP" if len(problems) == 1 else "macro AP", value, interval, data.evaluate)


def reliability_plot(data: PlotData) -> Figure:
    """Observed frequency against predicted probability per bin (binary: of the positive class; else of
    the top class being right), with the counts of predictions below."""
    task, bins = data.task, data.config.calibration_bins
    binary = len(task.classes) == 2

    def calibration_pairs(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        proba = task.probabilities(rows)
        y = class_indices([class_key(v) for v in rows["target"]], task.classes)
        if binary:
            return y == 1, proba[:, 1]
        return proba.argmax(axis=1) == y, proba.max(axis=1)

    fig = data.figure()
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], **CHANCE, label="perfect calibration")
    series = [
        (f"fold {k}", rows, {**FOLD, "color": fold_colour(k), "marker": "."})
        for k, rows in data.folds.items()
    ]
    for label, rows, style in [*series, ("pooled", data.pooled, {**POOLED, "marker": "o"})]:
        y, p = calibration_pairs(rows)
        if len(y) == 0:
            continue
        observed, predicted = calibration_curve(y, p, n_bins=bins, strategy="uniform")
        top.plot(predicted, observed, label=label, **style)
    _, p = calibration_pairs(data.pooled)
    bottom.hist(p, bins=np.linspace(0, 1, bins + 1), color="grey", edgecolor="white")
    bottom.set_ylabel("test bags")
    what = f"class {task.classes[1]}" if binary else "the predicted class"
    finish(top, "", f"observed frequency of {what}")
    bottom.set_xlabel(f"predicted probability of {what}")
    bottom.grid(alpha=0.3)
    title(fig, f"Reliability: {data.with_ci('ECE', 'ece')}", data.with_ci("Brier score", "brier"))
    return fig


# ------------------------------------------------------------------------------------------- survival


def _outcome(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return rows["time"].to_numpy(dtype=float), rows["event"].to_numpy(dtype=float).astype(bool)


def time_label(config: PlotConfig, column: str) -> str:
    """The time axis: its unit from the config, else the cohort table's time column (never a guessed unit)."""
    return f"time ({config.time_unit})" if config.time_unit else f"time (column {column})"


def kaplan_meier_plot(data: PlotData) -> Figure:
    """Kaplan-Meier curves (95 % log-log bands, + at censoring) of the pooled test bags split at the
    median predicted risk of each fold's test bags (each fold model has its own risk scale, so one median
    over the folds would sort whole folds into one group), with the log-rank test of the two groups and
    the numbers at risk below."""
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    time, event = _outcome(data.pooled)
    high = high_risk(data.pooled)
    groups = [(~high, "low risk", "C0"), (high, "high risk", "C3")]
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * 1.25), dpi=data.config.dpi, layout="constrained")
    ax, at_risk = fig.subplots(2, 1, height_ratios=[4, 1])
    for group, name, colour in groups:
        if not group.any():
            continue
        t, s, (low, up) = kaplan_meier_estimator(event[group], time[group], conf_type="log-log")
        t, s, low, up = (np.r_[0.0, t], np.r_[1.0, s], np.r_[1.0, low], np.r_[1.0, up])
        ax.step(
            t, s, where="post", color=colour, label=f"{name} (n={group.sum()}, {event[group].sum()} events)"
        )
        ax.fill_between(t, low, up, step="post", color=colour, alpha=0.15)
        censored = time[group][~event[group]]
        at = s[np.searchsorted(t, censored, side="right") - 1]
        ax.plot(censored, at, "+", color=colour, markersize=7)
    p_value = math.nan
    if high.any() and (~high).any():
        _, p_value = compare_survival(Surv.from_arrays(event, time), np.where(high, "high", "low"))
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, float(time.max()) * 1.02 if len(time) else 1.0)
    finish(ax, time_label(data.config, data.task.label_columns[0]), "survival probability", unit_square=False)
    numbers_at_risk(at_risk, ax, time, groups)
    p_text = "log-rank p undefined" if not math.isfinite(p_value) else f"log-rank p = {p_value:.2g}"
    title(fig, f"Predicted risk groups (median split in each fold): {p_text}", data.with_ci("c-index", "c_index"))
    return fig


def high_risk(pooled: pd.DataFrame) -> np.ndarray:
    """Whether each test bag's risk lies above the median of its fold's test bags (one fixed test set: its
    median)."""
    risk = pooled["score"].astype(float)
    return (risk > risk.groupby(pooled["fold"]).transform("median")).to_numpy()


def numbers_at_risk(table, curves, time: np.ndarray, groups: list[tuple[np.ndarray, str, str]]) -> None:
    """The table under a Kaplan-Meier plot: per group, the bags still followed (time >= t) at the curve
    axis's ticks, in the group's colour."""
    table.set_xlim(curves.get_xlim())
    ticks = [t for t in curves.get_xticks() if curves.get_xlim()[0] <= t <= curves.get_xlim()[1]]
    for row, (group, _, colour) in enumerate(groups):
        for t in ticks:
            table.text(t, row, str(int(np.sum(time[group] >= t))), ha="center", va="center", color=colour)
    table.set_yticks(range(len(groups)), [name for _, name, _ in groups])
    table.set_ylim(len(groups) - 0.5, -0.5)
    table.set_xticks([])
    for side in table.spines.values():
        side.set_visible(False)
    table.tick_params(left=False)
    table.set_title("number at risk", fontsize="small", loc="left")


def time_auc_plot(data: PlotData) -> Figure:
    """Cumulative/dynamic AUC at the evaluation times: each fold against its own training censoring
    distribution; one fixed test set scored by every fold (the mean risk) also against all training bags.
    Folds with their own test sets have no pooled curve: each fold model has its own risk scale."""
    fig = data.figure()
    ax = fig.subplots()
    series = [
        (f"fold {k}", rows, data.fold_train.get(k), {**FOLD, "color": fold_colour(k)})
        for k, rows in data.folds.items()
    ]
    if not data.separate_folds:
        series.append(("pooled", data.pooled, data.train, POOLED))
    drawn = False
    for label, rows, train, style in series:
        curve = data.task.auc_curve(rows, train if train is not None and len(train) else None)
        if len(curve):
            ax.plot(curve["time"], curve["auc"], marker=".", label=label, **style)
            drawn = True
    if not drawn:
        no_data(ax, "not defined: too few test bags or events")
    ax.axhline(0.5, **CHANCE)
    ax.set_ylim(0, 1.02)
    finish(
        ax,
        time_label(data.config, data.task.label_columns[0]),
        "time-dependent AUC (cumulative/dynamic)",
        unit_square=False,
    )
    title(fig, "Time-dependent AUC of the predicted risk", data.with_ci("mean AUC", "td_auc"))
    return fig


# ------------------------------------------------------------------------------------------ regression


def unit(data: PlotData) -> str:
    """The unit suffix: " %" for a percentage target (value range 0-100, as sTIL), else none (unknown)."""
    return " %" if data.task.value_range == [0.0, 100.0] else ""


def value_name(data: PlotData) -> str:
    """What the regression values are: the config's label (e.g. "sTIL %"), else the target column."""
    return data.config.value_label or data.task.column + (" (%)" if unit(data) else "")


def _value_label(data: PlotData, prefix: str) -> str:
    return f"{prefix} {value_name(data)}"


def scatter_plot(data: PlotData) -> Figure:
    """Predicted against true values of every test bag, coloured by fold, with the identity line and
    the sTIL-high threshold on both axes."""
    fig = data.figure()
    ax = fig.subplots()
    for k, rows in data.folds.items():
        ax.scatter(rows["target"], rows["score"], s=18, color=fold_colour(k), alpha=0.8, label=f"fold {k}")
    values = np.r_[data.pooled["target"].to_numpy(float), data.pooled["score"].to_numpy(float)]
    values = values[np.isfinite(values)]
    low, high = (values.min(), values.max()) if len(values) else (0.0, 1.0)
    ax.plot([low, high], [low, high], **CHANCE, label="identity")
    threshold = data.task.threshold
    ax.axvline(threshold, color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(
        threshold, color="grey", linestyle=":", linewidth=0.8, label=f"threshold {threshold:g}{unit(data)}"
    )
    ax.set_aspect("equal", adjustable="datalim")
    finish(ax, _value_label(data, "true"), _value_label(data, "predicted"), unit_square=False)
    title(fig, data.with_ci("R²", "r2"), data.with_ci("Pearson r", "pearson"))
    return fig


def high_low_roc_plot(data: PlotData) -> Figure:
    """ROC of the predicted value separating bags at or above the threshold (sTIL-high) from the rest."""
    threshold = data.task.threshold
    fig = data.figure()
    ax = fig.subplots()
    series = [(f"fold {k}", rows, {**FOLD, "color": fold_colour(k)}) for k, rows in data.folds.items()]
    drawn = False
    for label, rows, style in [*series, ("pooled", data.pooled, POOLED)]:
        y = rows["target"].to_numpy(float) >= threshold
        if not both_classes(y):
            continue
        fpr, tpr, _ = skm.roc_curve(y, rows["score"].to_numpy(float))
        ax.plot(fpr, tpr, label=f"{label} (AUC {skm.roc_auc_score(y, rows['score']):.2f})", **style)
        drawn = True
    if not drawn:
        no_data(ax, f"not defined: all test bags on one side of {threshold:g}")
    ax.plot([0, 1], [0, 1], **CHANCE)
    finish(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)")
    title(
        fig,
        f"ROC of high {value_name(data)} (>= {threshold:g}{unit(data)}) vs low",
        data.with_ci("AUC", "auc_high"),
    )
    return fig


PLOT_DIR = "plots"  # sub-folder of the evaluation folder (the workflow's report picks it up whole)
PLOTS: dict[str, dict[str, Callable[[PlotData], Figure]]] = {
    "classification": {
        "roc.png": lambda d: curve_plot(d, "roc"),
        "pr.png": lambda d: curve_plot(d, "pr"),
        "reliability.png": reliability_plot,
    },
    "survival": {"kaplan_meier.png": kaplan_meier_plot, "time_auc.png": time_auc_plot},
    "regression": {"scatter.png": scatter_plot, "roc_high.png": high_low_roc_plot},
}


def write_plots(
    task: Task,
    predictions: pd.DataFrame,
    pooled_test: pd.DataFrame,
    train_rows: pd.DataFrame,
    metrics: dict[str, float],
    ci: dict[str, list[float]],
    out_dir: str | os.PathLike,
    evaluate: EvaluateConfig | None = None,
    config: PlotConfig | None = None,
    statistics: dict[str, str] | None = None,
) -> list[str]:
    """Write the task's plots as PNG into ``out_dir/plots``; return their paths relative to ``out_dir``.

    ``predictions`` holds every run's rows (all splits); ``pooled_test``, ``train_rows``, ``metrics``,
    ``ci`` and ``statistics`` (each metric's statistic as a person reads it: ``pooled``, ``mean over 5
    folds``) are what :func:`pathmil.evaluation.summary.evaluate_runs` computed from them.
    """
    test = predictions[predictions["split"] == "test"]
    train = predictions[predictions["split"] == "train"]
    data = PlotData(
        task=task,
        folds={int(k): rows for k, rows in test.groupby("fold")},
        fold_train={int(k): rows for k, rows in train.groupby("fold")},
        pooled=pooled_test,
        train=train_rows,
        metrics=metrics,
        ci=ci,
        evaluate=evaluate or EvaluateConfig(),
        config=config or PlotConfig(),
        statistics=statistics or {},
    )
    names = []
    for name, plot in PLOTS[task.name].items():
        figure = plot(data)
        with atomic_output(Path(out_dir) / PLOT_DIR / name) as tmp:
            figure.savefig(tmp, dpi=data.config.dpi)
        names.append(f"{PLOT_DIR}/{name}")
    return names


# ------------------------------------------------------------------------------------- comparisons


def _panel_grid(n: int, dpi: int, columns: int = 3) -> tuple[Figure, list]:
    """A figure of ``n`` panels, at most ``columns`` to a row (unused panels hidden)."""
    ncols = min(columns, max(n, 1))
    nrows = math.ceil(max(n, 1) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 4.0 * nrows), dpi=dpi, layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def performance_profile_plot(comparison: dict, evaluate: EvaluateConfig, config: PlotConfig) -> Figure:
    """The share of each configuration's runs scoring above each threshold, with bootstrap bands over runs
    (Agarwal et al., NeurIPS 2021): a curve further right is better at every level."""
    fig = Figure(figsize=FIGSIZE, dpi=config.dpi, layout="constrained")
    ax = fig.subplots()
    runs = {row["configuration"]: row["n_runs"] for row in comparison["configurations"]}
    for index, (label, rows) in enumerate(comparison["profiles"].items()):
        profile = pd.DataFrame(rows)
        colour = fold_colour(index)
        name = f"{label} ({runs[label]} runs)"
        ax.step(profile["threshold"], profile["share"], where="post", color=colour, linewidth=1.8, label=name)
        if profile["low"].notna().any():
            ax.fill_between(
                profile["threshold"], profile["low"], profile["high"], step="post", color=colour, alpha=0.15
            )
    ax.set_ylim(-0.02, 1.02)
    metric = comparison["main_metric"]
    finish(ax, f"{metric} threshold τ", f"share of runs with {metric} > τ", unit_square=False)
    title(
        fig,
        f"Performance profiles, {comparison['task']}: runs = seeds x folds",
        f"bands: {100 * evaluate.confidence:g} % bootstrap over runs",
    )
    return fig


def difference_matrix_plot(comparison: dict, evaluate: EvaluateConfig, config: PlotConfig) -> Figure:
    """Paired differences of the main metric, row minus column, with their bootstrap intervals over
    patients and P(row > column) over runs. Only differences whose interval excludes zero are coloured
    (and bold); the others stay grey, so a large but uncertain difference does not look like a finding."""
    order = [row["configuration"] for row in sorted(comparison["configurations"], key=lambda r: -r["value"])]
    n = len(order)
    pairs = {(p["a"], p["b"]): p for p in comparison["pairs"]}
    values = np.full((n, n), np.nan)  # coloured cells: the significant differences
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            if i != j and pairs[(a, b)]["significant"]:
                values[i, j] = pairs[(a, b)]["difference"]
    differences = [abs(p["difference"]) for p in comparison["pairs"] if math.isfinite(p["difference"])]
    limit = max(max(differences, default=0.0), 1e-6)
    fig = Figure(
        figsize=(max(4.5, 1.9 * n + 2.2), max(3.8, 1.5 * n + 1.8)), dpi=config.dpi, layout="constrained"
    )
    ax = fig.subplots()
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-limit, vmax=limit)
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            if i == j:
                ax.text(j, i, "—", ha="center", va="center", color="grey")
                continue
            pair = pairs[(a, b)]
            text = f"{pair['difference']:+.3f}\n[{pair['ci_low']:.3f}, {pair['ci_high']:.3f}]\nP = {pair['p_improvement']:.2f}"
            strong = pair["significant"] and abs(pair["difference"]) > 0.6 * limit
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize="small",
                color="white" if strong else "black",
                fontweight="bold" if pair["significant"] else "normal",
            )
    ax.set_xticks(range(n), order, rotation=30, ha="right")
    ax.set_yticks(range(n), order)
    ax.set_xlabel("column (B)")
    ax.set_ylabel("row (A)")
    metric = comparison["main_metric"]
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"{metric} difference, A - B")
    title(
        fig,
        f"{comparison['task']}: {metric} of A - B on the same {comparison['n_patients']} patients",
        f"[{100 * evaluate.confidence:g} % paired bootstrap CI]; P = P(A > B) over runs; "
        "coloured: CI excludes 0",
    )
    return fig


def comparison_calibration_plot(comparison: dict, evaluate: EvaluateConfig, config: PlotConfig) -> Figure:
    """One panel per configuration. Classification: reliability diagram (observed frequency against mean
    predicted probability per equal-width bin, marker area by bag count). Survival: mean predicted
    survival at the horizon against the Kaplan-Meier estimate per group of predicted survival, with 95 %
    intervals, and the D-calibration test."""
    diagrams = comparison["calibration"]
    rows = {row["configuration"]: row for row in comparison["configurations"]}
    fig, axes = _panel_grid(len(diagrams), config.dpi)
    survival = comparison["task"] == "survival"
    for ax, (label, diagram) in zip(axes, diagrams.items()):
        ax.plot([0, 1], [0, 1], **CHANCE)
        table = pd.DataFrame(diagram.get("table", []))
        row = rows[label]
        if table.empty:
            no_data(ax, "no calibration data")
        elif survival:
            below = (table["observed"] - table["observed_low"]).clip(lower=0)
            above = (table["observed_high"] - table["observed"]).clip(lower=0)
            ax.errorbar(
                table["predicted"], table["observed"], yerr=[below, above], fmt="o", color="C0", capsize=3
            )
            p = diagram["d_calibration"]["p_value"]
            ax.set_title(f"{label}\nD-calibration p = {p:.2g} (seed {diagram['seed']})", fontsize="medium")
        else:
            sizes = 300 * table["n"] / table["n"].max()
            ax.plot(table["mean_predicted"], table["observed"], color="C0", linewidth=1)
            ax.scatter(table["mean_predicted"], table["observed"], s=sizes, color="C0", alpha=0.7)
            ax.set_title(
                f"{label} (seed {diagram['seed']})\nECE {row['ece']:.3f}, adaptive {row['ece_adaptive']:.3f}, "
                f"balance {row['balance']:+.3f}",
                fontsize="medium",
            )
        if survival:
            time = f"{comparison['horizon']:.3g} {config.time_unit or ''}".rstrip()
            finish(ax, f"predicted survival at {time}", f"Kaplan-Meier survival at {time}")
        else:
            what = diagram.get("what", "")
            finish(ax, f"predicted probability ({what})", "observed frequency")
    if survival:
        title(fig, "Calibration at the median follow-up: groups of predicted survival (mean over the group)")
    else:
        title(fig, f"Reliability diagrams, {config.calibration_bins} equal-width bins (marker area: bags)")
    return fig


COMPARISON_PLOTS: dict[str, Callable[[dict, EvaluateConfig, PlotConfig], Figure]] = {
    "performance_profile.png": performance_profile_plot,
    "differences.png": difference_matrix_plot,
    "calibration.png": comparison_calibration_plot,
}


def write_comparison_plots(
    comparison: dict, out_dir: str | os.PathLike, evaluate: EvaluateConfig, config: PlotConfig
) -> list[str]:
    """Write the comparison's plots (regression has no calibration plot) as PNG into ``out_dir/plots``;
    return their paths relative to ``out_dir``."""
    names = []
    for name, plot in COMPARISON_PLOTS.items():
        if name == "calibration.png" and comparison["task"] == "regression":
            continue
        figure = plot(comparison, evaluate, config)
        with atomic_output(Path(out_dir) / PLOT_DIR / name) as tmp:
            figure.savefig(tmp, dpi=config.dpi)
        names.append(f"{PLOT_DIR}/{name}")
    return names
