"""Summarise the runs of a cross-validation: per-fold and pooled metrics with confidence intervals.

A handful of folds gives noisy numbers, so besides the mean and standard deviation across folds pathmil
reports the interquartile mean (Agarwal et al., "Deep reinforcement learning at the edge of the
statistical precipice", NeurIPS 2021) and a stratified bootstrap 95 % confidence interval of every metric
on the pooled test predictions (each bag scored by the model of the fold that held it out; where folds share
a fixed test set, the mean of the folds' scores).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pathmil.errors import PathmilError
from pathmil.evaluation.bootstrap import bootstrap_distribution, grouped_resamples, iqm, percentile_interval
from pathmil.evaluation.report import FOLD_MEAN, statistic_label
from pathmil.evaluation.settings import EvaluateConfig, PlotConfig
from pathmil.fileio import atomic_output, write_json
from pathmil.tasks import Task
from pathmil.training.run import TrainedRun, load_run

ID_COLUMNS = ("slide_id", "patient_id", "fold", "split")

log = logging.getLogger(__name__)


def configuration(run: TrainedRun) -> tuple[str, str | None, str, int]:
    """(task, encoder, aggregator, seed): what the folds of one evaluation share."""
    return (run.config.task, run.encoder_label, run.config.aggregator, run.config.seed)


def read_run(run_dir: str | os.PathLike) -> pd.DataFrame:
    """A run's ``predictions.csv``; a bag without a score (NaN or empty) is refused, naming it.

    Raises:
        PathmilError: no predictions, or a missing or non-finite score.
    """
    path = Path(run_dir) / "predictions.csv"
    if not path.is_file():
        raise PathmilError(f"run {run_dir} has no predictions.csv; is training finished?")
    table = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})
    scores = [c for c in table.columns if c == "score" or c.startswith(("score_", "surv_"))]
    if "score" not in scores:
        raise PathmilError(f"{path} has no score column; train the run again")
    values = table[scores].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise PathmilError(
            f"{path} has no finite score for {int(bad.sum())} bag(s) (first: {table['slide_id'].iloc[bad.argmax()]}); "
            "a diverged or damaged run: train it again"
        )
    return table


def pool_test(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per test bag; bags tested in several folds (a fixed test set) get the mean of the folds'
    probabilities, risks or values (a multi-class prediction is then the class of highest mean probability)."""
    test = predictions[predictions["split"] == "test"]
    if not test.duplicated("slide_id").any():
        return test.reset_index(drop=True)
    class_columns = [c for c in test.columns if c.startswith("score_")]
    averaged = class_columns + [c for c in test.columns if c.startswith("surv_")]
    if not class_columns:
        averaged.append("score")
    first = test.groupby("slide_id", sort=False).first().drop(columns=averaged)
    pooled = first.join(test.groupby("slide_id", sort=False)[averaged].mean()).reset_index()
    if class_columns:
        best = pooled[class_columns].to_numpy().argmax(axis=1)
        pooled["score"] = best
        if "prediction" in pooled.columns:
            pooled["prediction"] = [class_columns[i].removeprefix("score_") for i in best]
    pooled["fold"] = -1  # an ensemble of folds
    return pooled


def drop_incomparable_curves(predictions: pd.DataFrame, states: list[dict[str, Any]]) -> pd.DataFrame:
    """Survival curves (``surv_<j>``) of folds with different time bins cannot be pooled: a column j means
    a different time in each fold. Drop them then (pooled integrated Brier score becomes NaN; the per-fold
    values stay)."""
    edges = {tuple(state.get("edges", ())) for state in states}
    if len(edges) <= 1:
        return predictions
    return predictions.drop(columns=[c for c in predictions.columns if c.startswith("surv_")])


def label_frame(task: Task, table: pd.DataFrame) -> pd.DataFrame:
    """The task's label columns rebuilt from a predictions table (target, or time and event)."""
    if "target" in table.columns:
        return pd.DataFrame({task.label_columns[0]: table["target"].to_numpy()})
    return pd.DataFrame(
        {task.label_columns[0]: table["time"].to_numpy(), task.label_columns[1]: table["event"].to_numpy()}
    )


def fold_wise(task: Task) -> bool:
    """Whether the task's main statistic is the mean over folds of each fold's metric rather than the metric
    of the pooled folds: survival's c-index ranks risks, and each fold model has its own risk scale, so a
    pooled c-index mixes scales (a model that orders every fold's patients well can pool to near 0.5)."""
    return task.main_metric in task.fold_wise_metrics


def patient_groups(test: pd.DataFrame) -> np.ndarray:
    """Each test row's patient, for resampling a patient's bags together; a row without a patient id (an
    external predictions table) is a patient of its own, named by its slide id."""
    slides = "slide " + test["slide_id"].astype(str)
    if "patient_id" not in test.columns:
        return slides.to_numpy()
    known = test["patient_id"].notna() & (test["patient_id"].astype(str).str.strip() != "")
    return ("patient " + test["patient_id"].astype(str)).where(known, slides).to_numpy()


def bootstrap_ci(
    task: Task, test: pd.DataFrame, train: pd.DataFrame | None, config: EvaluateConfig
) -> dict[str, list[float]]:
    """Percentile confidence intervals of every metric, resampling the test patients within strata (a
    patient's bags together: :func:`pathmil.evaluation.bootstrap.grouped_resamples`)."""
    strata = np.asarray(task.stratify_labels(label_frame(task, test)))
    draws: list[dict[str, float]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resamples without both classes or events yield NaN, not noise
        for index in grouped_resamples(strata, patient_groups(test), config.n_bootstrap, config.seed):
            draws.append(task.metrics(test.iloc[index].reset_index(drop=True), train))
    table = pd.DataFrame(draws)
    return {m: percentile_interval(table[m].to_numpy(), config.confidence) for m in table.columns}


def fold_means(
    task: Task, per_fold: pd.DataFrame
) -> tuple[dict[str, float], dict[str, int]]:
    """The mean over folds of each of the task's ``fold_wise_metrics`` and how many folds it holds: a fold
    whose value is undefined (NaN: no comparable pair, no event in its test part) is left out, with a
    warning naming it, and the count says so (:func:`statistic_label`)."""
    means, used = {}, {}
    for metric in task.fold_wise_metrics:
        values = per_fold[metric].to_numpy(dtype=float)
        finite = np.isfinite(values)
        used[metric] = int(finite.sum())
        means[metric] = float(values[finite].mean()) if finite.any() else math.nan
        if not finite.all():
            missing = ", ".join(str(f) for f in per_fold["fold"][~finite])
            log.warning(
                "%s is undefined in fold %s (too few events or comparable pairs in its test part): "
                "reported as the %s",
                metric, missing, statistic_label(FOLD_MEAN, used[metric], len(values)),
            )  # fmt: skip
    return means, used


def main_statistic(task: Task, table: pd.DataFrame) -> float:
    """The main statistic of test predictions, as evaluate reports and compare compares it: the task's main
    metric of the pooled folds, or for :func:`fold_wise` tasks the mean of the folds' (a fixed test set is
    one group)."""
    if not fold_wise(task):
        return task.main_score(table)
    values = [task.main_score(part) for _, part in table.groupby("fold")]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def fold_mean_interval(task: Task, test: pd.DataFrame, config: EvaluateConfig) -> list[float]:
    """Percentile interval of :func:`main_statistic` for a :func:`fold_wise` task: every replicate resamples
    the test patients of all folds within their strata (as compare does), then scores each fold's drawn
    patients. (Resampling each fold on its own keeps strata of one or two patients fixed: with 10 patients a
    fold, the interval of the demo's best model lay wholly above its estimate.)"""
    strata = np.asarray(task.stratify_labels(label_frame(task, test)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample without events gives NaN, left out
        values = bootstrap_distribution(
            lambda index: main_statistic(task, test.iloc[index]), strata, config.n_bootstrap, config.seed,
            patient_groups(test),
        )  # fmt: skip
    return percentile_interval(values[:, 0], config.confidence)


def evaluate_runs(
    run_dirs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: EvaluateConfig | None = None,
    plots: PlotConfig | None = None,
) -> dict[str, Any]:
    """Per-fold and pooled metrics of the given runs (one per fold), with CIs, and the task's plots (PNG,
    listed under "plots" in metrics.json); written to ``out_dir``."""
    config = config or EvaluateConfig()
    if not run_dirs:
        raise PathmilError("no runs given to evaluate")
    first = load_run(run_dirs[0], with_model=False)
    task, run_config = first.task, first.config
    predictions, fold_tasks = [], {}
    for run in run_dirs:
        loaded = load_run(run, with_model=False)
        run_task = loaded.task
        if configuration(loaded) != configuration(first):
            raise PathmilError(
                f"run {run} is a {'/'.join(map(str, configuration(loaded)))} run, not "
                f"{'/'.join(map(str, configuration(first)))}; evaluate the folds of one task, encoder, "
                "aggregator and seed together (`pathmil compare` compares configurations)"
            )
        rows = read_run(run)
        predictions.append(rows)
        for fold in rows["fold"].unique():
            fold_tasks[int(fold)] = run_task  # each fold's metrics with its own fitted task (survival bins)
    predictions = pd.concat(predictions, ignore_index=True)
    states = [t.state_dict() for t in fold_tasks.values()]
    per_fold = []
    for fold, rows in predictions.groupby("fold"):
        test, train = rows[rows["split"] == "test"], rows[rows["split"] == "train"]
        per_fold.append(
            {"fold": int(fold), "n_test": len(test), **fold_tasks[int(fold)].metrics(test, train)}
        )
    per_fold = pd.DataFrame(per_fold)
    pooled_test = pool_test(drop_incomparable_curves(predictions, states))
    train_rows = predictions[predictions["split"] == "train"].drop_duplicates("slide_id")
    pooled = task.metrics(pooled_test, train_rows)
    ci = bootstrap_ci(task, pooled_test, train_rows, config) if config.n_bootstrap > 0 else {}
    metric_names = [c for c in per_fold.columns if c not in ("fold", "n_test")]
    statistic = dict.fromkeys(metric_names, "pooled")
    folds_used = dict.fromkeys(metric_names, len(per_fold))
    if pooled_test["fold"].nunique() > 1:  # the folds' own test sets, not one fixed test set
        means, used = fold_means(task, per_fold)  # their mean over folds; the interval of the main one
        for m in task.fold_wise_metrics:
            statistic[m], pooled[m], folds_used[m], ci[m] = FOLD_MEAN, means[m], used[m], [math.nan] * 2
        if fold_wise(task) and config.n_bootstrap > 0:
            ci[task.main_metric] = fold_mean_interval(task, pooled_test, config)
    summary_rows = [
        {
            "metric": m,
            "statistic": statistic[m],
            "folds": folds_used[m],  # of len(per_fold); fewer where a fold's value is undefined
            "pooled": pooled.get(m, math.nan),
            "ci_low": ci.get(m, [math.nan] * 2)[0],
            "ci_high": ci.get(m, [math.nan] * 2)[1],
            "fold_mean": float(np.nanmean(per_fold[m])) if per_fold[m].notna().any() else math.nan,
            "fold_std": float(np.nanstd(per_fold[m], ddof=1)) if per_fold[m].notna().sum() > 1 else math.nan,
            "fold_iqm": iqm(per_fold[m].to_numpy()),
        }
        for m in metric_names
    ]
    summary = pd.DataFrame(summary_rows)
    result = {
        "task": task.name,
        "encoder": first.encoder_label,
        "aggregator": run_config.aggregator,
        "seed": run_config.seed,
        "main_metric": task.main_metric,
        "statistic": statistic[task.main_metric],
        "folds": len(per_fold),
        "runs": [str(r) for r in run_dirs],
        "n_test_bags": len(pooled_test),
        "evaluate": config.to_dict(),
        "pooled": pooled,
        "ci": ci,
        "per_fold": per_fold.to_dict("records"),
        "summary": summary.to_dict("records"),
    }
    out_dir = Path(out_dir)
    for name, table in (
        ("metrics_per_fold.csv", per_fold),
        ("metrics_summary.csv", summary),
        ("predictions_test.csv", pooled_test),
    ):
        with atomic_output(out_dir / name) as tmp:
            table.to_csv(tmp, index=False)
    from pathmil.evaluation.plots import write_plots  # lazy: matplotlib

    labels = {m: statistic_label(statistic[m], folds_used[m], len(per_fold)) for m in metric_names}
    result["plots"] = write_plots(
        task, predictions, pooled_test, train_rows, pooled, ci, out_dir, config, plots or PlotConfig(), labels
    )
    write_json(out_dir / "metrics.json", result)
    return result


def evaluate_external(
    predictions: pd.DataFrame,
    task: Task,
    out_dir: str | os.PathLike,
    config: EvaluateConfig | None = None,
    plots: PlotConfig | None = None,
    aggregator: str = "",
) -> dict[str, Any]:
    """Metrics, bootstrap CIs and plots of a labelled external test set (``pathmil predict`` on a cohort
    the models never saw: every row is a test bag), as :func:`evaluate_runs` writes them for
    cross-validation. ``task`` is a fitted task of the models (its classes, bins, scaling). Without training
    rows, survival metrics take the censoring distribution from the test rows.

    Raises:
        PathmilError: predictions without the task's labels (``target``, or ``time`` and ``event``).
    """
    config = config or EvaluateConfig()
    needed = ["target"] if task.name != "survival" else ["time", "event"]
    missing = [c for c in needed if c not in predictions.columns]
    if missing or predictions[needed].isna().any().any():
        raise PathmilError(
            f"the predictions lack the labels {', '.join(needed)} an evaluation needs; predict with a cohort "
            "table that holds the task's label columns for every slide"
        )
    test = predictions.assign(split="test", fold=0).reset_index(drop=True)
    pooled = task.metrics(test, None)
    ci = bootstrap_ci(task, test, None, config) if config.n_bootstrap > 0 else {}
    summary = pd.DataFrame(
        [
            {
                "metric": m,
                "statistic": "pooled",
                "pooled": v,
                "ci_low": ci.get(m, [math.nan] * 2)[0],
                "ci_high": ci.get(m, [math.nan] * 2)[1],
            }
            for m, v in pooled.items()
        ]
    )
    result = {
        "task": task.name,
        "aggregator": aggregator,
        "main_metric": task.main_metric,
        "statistic": "pooled",
        "external": True,
        "n_test_bags": len(test),
        "evaluate": config.to_dict(),
        "pooled": pooled,
        "ci": ci,
        "summary": summary.to_dict("records"),
    }
    out_dir = Path(out_dir)
    for name, table in (("metrics_summary.csv", summary), ("predictions_test.csv", test)):
        with atomic_output(out_dir / name) as tmp:
            table.to_csv(tmp, index=False)
    from pathmil.evaluation.plots import write_plots  # lazy: matplotlib

    result["plots"] = write_plots(
        task, test.assign(split="external"), test, test, pooled, ci, out_dir, config, plots or PlotConfig()
    )
    write_json(out_dir / "metrics.json", result)
    return result


def summarise_evaluations(eval_dirs: list[str | os.PathLike]) -> pd.DataFrame:
    """One table of every evaluated task x aggregator: metric, pooled value, CI and fold statistics; an
    external test set (:func:`evaluate_external`) is a row of its own, ``<aggregator> (external)``."""
    rows = []
    for directory in eval_dirs:
        path = Path(directory) / "metrics.json"
        if not path.is_file():
            raise PathmilError(f"{directory} holds no metrics.json from `pathmil evaluate`")
        import json

        result = json.loads(path.read_text())
        for row in result["summary"]:
            rows.append(
                {
                    "task": result["task"],
                    "encoder": result.get("encoder"),
                    "aggregator": result["aggregator"] + (" (external)" if result.get("external") else ""),
                    "seed": result.get("seed", 0),
                    "main": row["metric"] == result["main_metric"],
                    **row,
                }
            )
    return pd.DataFrame(rows)
