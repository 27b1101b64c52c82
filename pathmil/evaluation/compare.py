"""Which configuration is better? Paired comparisons of the (encoder, aggregator) configurations of one task.

A configuration is trained over seeds x folds; every training run (``pathmil train``) leaves a run folder
with ``best.pt``, ``predictions.csv`` and ``metrics.json``. Its label (encoder, aggregator, seed, fold) is
read from those files, never from the folder's path; a run started from a source model
(``train.init_from``) is another configuration, ``<aggregator> (fine-tuned)`` (``... from <source>`` when
one aggregator was fine-tuned from several sources), beside the same aggregator
trained from scratch. Following Agarwal et al. ("Deep reinforcement learning at the edge of the
statistical precipice", NeurIPS 2021), each configuration gets:

- its **main metric** (the task's ``main_metric``: AUC, c-index, R^2) on the pooled out-of-fold test
  predictions of each seed, averaged over seeds, with a stratified bootstrap interval over patients; for
  survival the mean of the folds' c-indices instead (:func:`fold_wise`: each fold model has its own risk
  scale, which a pooled c-index mixes);
- the **interquartile mean** (IQM) of its per-run scores (seeds x folds) with a bootstrap interval over
  runs (:func:`pathmil.evaluation.bootstrap.iqm_interval`);
- a **performance profile**: the share of its runs scoring above each threshold, with bootstrap bands.

Every pair (A, B) gets the **difference** of their main metrics with a *paired* stratified bootstrap
interval: each replicate resamples the patients once (within strata of class, or event x follow-up bin)
and scores both configurations on that same resample, so the patients' shared difficulty cancels and the
interval is far narrower than two overlapping per-configuration intervals suggest. Both must therefore
have predictions for the same patients (a survival c-index over other patients is another quantity);
anything else is refused. And the **probability of improvement** P(A > B) (Agarwal et al.'s definition:
the Mann-Whitney U statistic over pairs of runs, U / (n m), a tie counting one half), taken fold by fold
and averaged over the folds: runs of different folds are scored on different patients, and a comparison
across folds would measure the folds' difficulty, not the configurations (the folds play the role of
Agarwal et al.'s tasks, the seeds that of their runs). With one seed it is the share of folds A wins.

A verdict names a winner only where the difference's interval excludes zero; otherwise it says "no
detectable difference". Calibration (:mod:`pathmil.evaluation.calibration`) is computed on each seed's
pooled out-of-fold predictions; scalars are averaged over seeds, diagrams show the first seed.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from pathmil.errors import PathmilError
from pathmil.evaluation import calibration
from pathmil.evaluation.bootstrap import (
    bootstrap_distribution,
    iqm,
    iqm_interval,
    percentile_interval,
)
from pathmil.evaluation.report import FOLD_MEAN
from pathmil.evaluation.settings import EvaluateConfig, PlotConfig
from pathmil.evaluation.summary import (
    drop_incomparable_curves,
    fold_wise,
    label_frame,
    main_statistic,
    patient_groups,
    pool_test,
)
from pathmil.evaluation.summary import read_run as read_predictions
from pathmil.fileio import atomic_output, write_json
from pathmil.tasks import Task
from pathmil.tasks.classification import class_key
from pathmil.tasks.metrics import class_indices
from pathmil.training.run import encoder_name, load_run

log = logging.getLogger(__name__)

RUN_FILES = ("best.pt", "predictions.csv", "metrics.json")
PROFILE_POINTS = 101  # thresholds of a performance profile
SURVIVAL_GROUPS = 4  # groups of predicted survival in the calibration table at the horizon


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One training run: one configuration, seed and fold."""

    path: Path
    task: Task  # fitted on the run's training bags
    encoder: str | None
    aggregator: str
    seed: int
    fold: int
    predictions: pd.DataFrame  # every split's rows
    source: str | None = None  # train.init_from of a fine-tuned run

    @property
    def test(self) -> pd.DataFrame:
        return self.predictions[self.predictions["split"] == "test"]

    @property
    def train(self) -> pd.DataFrame:
        return self.predictions[self.predictions["split"] == "train"]


def is_run(path: Path) -> bool:
    return all((path / name).is_file() for name in RUN_FILES)


def find_runs(paths: list[str | os.PathLike]) -> list[Path]:
    """Run folders: each path is one (it holds ``best.pt``, ``predictions.csv`` and ``metrics.json``) or a
    folder searched recursively for them. Each run once, in sorted order."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if is_run(path):
            found.add(path.resolve())
            continue
        if not path.is_dir():
            raise PathmilError(f"{path} is neither a training run folder nor a folder of runs")
        inner = {p.parent.resolve() for p in path.rglob("predictions.csv") if is_run(p.parent)}
        if not inner:
            raise PathmilError(f"no training runs (folders with {', '.join(RUN_FILES)}) under {path}")
        found |= inner
    return sorted(found)


def read_run(path: Path) -> Run:
    """A run's fitted task, labels (from its checkpoint's config and metrics.json) and predictions."""
    loaded = load_run(path, with_model=False)
    task, config = loaded.task, loaded.config
    info = json.loads((path / "metrics.json").read_text())
    features = info.get("features") or {}
    encoder = features.get("encoder")
    if encoder:  # the untrained baseline is another encoder
        encoder = encoder_name(str(encoder), bool(features.get("random_init")))
    return Run(
        path=path,
        task=task,
        encoder=encoder,
        aggregator=f"{config.aggregator} (fine-tuned)" if config.init_from else config.aggregator,
        seed=config.seed,
        fold=int(info["fold"]),
        predictions=read_predictions(path),
        source=config.init_from,
    )


def label_sources(runs: list[Run]) -> list[Run]:
    """``runs`` with the source named in the aggregator where one aggregator was fine-tuned from several."""
    sources: dict[tuple[str | None, str], set[str | None]] = {}
    for run in runs:
        sources.setdefault((run.encoder, run.aggregator), set()).add(run.source)
    return [
        replace(run, aggregator=f"{run.aggregator} from {run.source}")
        if len(sources[(run.encoder, run.aggregator)]) > 1
        else run
        for run in runs
    ]


@dataclass
class Configuration:
    """The runs of one (encoder, aggregator) over seeds x folds."""

    label: str
    encoder: str | None
    aggregator: str
    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})

    @property
    def folds(self) -> list[int]:
        return sorted({r.fold for r in self.runs})

    def seed_runs(self, seed: int) -> list[Run]:
        return sorted((r for r in self.runs if r.seed == seed), key=lambda r: r.fold)

    def pooled(self, seed: int) -> pd.DataFrame:
        """One row per test bag of the seed's folds (:func:`pool_test`), sorted by bag id."""
        runs = self.seed_runs(seed)
        rows = pd.concat([r.predictions for r in runs], ignore_index=True)
        pooled = pool_test(drop_incomparable_curves(rows, [r.task.state_dict() for r in runs]))
        return pooled.sort_values("slide_id").reset_index(drop=True)


def group_configurations(runs: list[Run]) -> list[Configuration]:
    """Runs grouped by (encoder, aggregator); all of one task, each (seed, fold) once per configuration.

    Labels are the aggregator when all runs share an encoder, the encoder when all share an aggregator,
    else ``encoder/aggregator``. Runs of one aggregator fine-tuned from several sources are a configuration
    per source, ``<aggregator> (fine-tuned) from <train.init_from>``.
    """
    runs = label_sources(runs)
    tasks = {(r.task.name, tuple(r.task.label_columns)) for r in runs}
    if len(tasks) > 1:
        names = ", ".join(f"{name} ({'/'.join(columns)})" for name, columns in sorted(tasks))
        raise PathmilError(
            f"the runs belong to several tasks: {names}; compare the runs of one task at a time"
        )
    groups: dict[tuple[str | None, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.encoder, run.aggregator), []).append(run)
    encoders = {e for e, _ in groups}
    aggregators = {a for _, a in groups}
    configurations = []
    for (encoder, aggregator), members in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if len(encoders) == 1:
            label = aggregator
        elif len(aggregators) == 1:
            label = str(encoder)
        else:
            label = f"{encoder}/{aggregator}"
        seen: dict[tuple[int, int], Path] = {}
        for run in members:
            key = (run.seed, run.fold)
            if key in seen:
                raise PathmilError(
                    f"{label}: seed {run.seed} fold {run.fold} twice ({seen[key]} and {run.path}); "
                    "give each run once"
                )
            seen[key] = run.path
        configurations.append(Configuration(label, encoder, aggregator, members))
    return configurations


def check_same_patients(configurations: list[Configuration]) -> None:
    """Every configuration and seed has test predictions for the same bags, fold by fold; else an error
    naming the first difference (a paired comparison over other patients would compare other things)."""
    reference = configurations[0]
    ref_seed = reference.seeds[0]
    expected = {r.fold: set(r.test["slide_id"]) for r in reference.seed_runs(ref_seed)}
    for config in configurations:
        for seed in config.seeds:
            folds = {r.fold: set(r.test["slide_id"]) for r in config.seed_runs(seed)}
            if folds.keys() != expected.keys():
                raise PathmilError(
                    f"{config.label} seed {seed} has folds {sorted(folds)} but {reference.label} seed "
                    f"{ref_seed} has {sorted(expected)}; compare runs over the same folds"
                )
            for fold, bags in folds.items():
                if bags != expected[fold]:
                    odd = sorted(bags ^ expected[fold])
                    raise PathmilError(
                        f"{config.label} seed {seed} fold {fold} tests other bags than {reference.label} "
                        f"seed {ref_seed} ({len(odd)} differ, e.g. {odd[0]}); paired comparisons need the "
                        "same patients and splits"
                    )


# ------------------------------------------------------------------------------------- statistics


def probability_of_improvement(x: dict[int, np.ndarray], y: dict[int, np.ndarray]) -> float:
    """P(X > Y) of Agarwal et al. (NeurIPS 2021), fold by fold and averaged over the folds both have.

    ``x`` and ``y`` map a fold to the scores of the runs (seeds) of configurations X and Y on that fold.
    Within a fold: the Mann-Whitney U statistic over all pairs of their runs divided by the number of
    pairs, each pair counting 1 when x > y, 0.5 when tied, 0 otherwise (``scipy.stats.mannwhitneyu``).
    NaN scores are left out; NaN when no fold has scores of both.
    """
    per_fold = []
    for fold in sorted(set(x) & set(y)):
        a, b = np.asarray(x[fold], float), np.asarray(y[fold], float)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if len(a) and len(b):
            per_fold.append(stats.mannwhitneyu(a, b).statistic / (len(a) * len(b)))
    return float(np.mean(per_fold)) if per_fold else math.nan


def performance_profile(
    scores: np.ndarray, thresholds: np.ndarray, n_resamples: int, confidence: float, seed: int
) -> pd.DataFrame:
    """The share of runs scoring above each threshold (Agarwal et al.'s performance profile, one task).

    ``scores`` (n_runs,) per-run scores (NaN left out); returns columns ``threshold``, ``share``, ``low``,
    ``high``: the share and its percentile bootstrap band over runs (``scipy.stats.bootstrap``; NaN with
    fewer than two runs or ``n_resamples`` 0).
    """
    scores = np.asarray(scores, float)
    scores = scores[np.isfinite(scores)]
    thresholds = np.asarray(thresholds, float)

    def share(values: np.ndarray) -> np.ndarray:
        return (values[:, None] > thresholds[None, :]).mean(axis=0)

    table = pd.DataFrame({"threshold": thresholds, "share": share(scores) if len(scores) else math.nan})
    table["low"] = table["high"] = math.nan
    if len(scores) >= 2 and n_resamples > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant shares (0 or 1) make degenerate, exact bands
            result = stats.bootstrap(
                (scores,),
                share,
                vectorized=False,
                n_resamples=n_resamples,
                confidence_level=confidence,
                method="percentile",
                random_state=np.random.default_rng(seed),
            )
        table["low"], table["high"] = result.confidence_interval.low, result.confidence_interval.high
    return table


def verdict(a: str, b: str, task: str, difference: float, ci: list[float], p_improvement: float) -> str:
    """One line: "A > B on task: +d [lo, hi], P(improvement) p" when the interval excludes zero (ordered
    so the better one comes first), else "A vs B on task: no detectable difference (...)"."""
    if all(math.isfinite(v) for v in ci) and (ci[0] > 0 or ci[1] < 0):
        if ci[1] < 0:
            a, b, difference, ci, p_improvement = b, a, -difference, [-ci[1], -ci[0]], 1 - p_improvement
        return f"{a} > {b} on {task}: {difference:+.3f} [{ci[0]:.3f}, {ci[1]:.3f}], P(improvement) {p_improvement:.2f}"
    return (
        f"{a} vs {b} on {task}: no detectable difference "
        f"({difference:+.3f} [{ci[0]:.3f}, {ci[1]:.3f}], P(improvement) {p_improvement:.2f})"
    )


@dataclass
class Patients:
    """The test bags shared by all configurations, grouped by patient, with the patients' strata."""

    bags: np.ndarray  # bag ids (slide_id), sorted: the row order of every aligned table
    rows: list[np.ndarray]  # per patient, the rows of its bags
    strata: np.ndarray  # per patient, the task's stratum (class, or event x follow-up bin)

    @classmethod
    def of(cls, task: Task, pooled: pd.DataFrame) -> Patients:
        patients = patient_groups(pooled)
        unique, first = np.unique(patients, return_index=True)
        rows = [np.flatnonzero(patients == p) for p in unique]
        strata = np.asarray(
            task.stratify_labels(label_frame(task, pooled.iloc[first].reset_index(drop=True)))
        )
        return cls(pooled["slide_id"].to_numpy(), rows, strata)

    def bag_rows(self, patients: np.ndarray) -> np.ndarray:
        return np.concatenate([self.rows[p] for p in patients])


def paired_bootstrap(
    scores: list[Any], strata: np.ndarray, n_resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The point values (k,) and bootstrap distribution (n_resamples, k) of k statistics computed on the
    same stratified resamples of the units: ``scores[j](indices) -> float`` scores configuration j on the
    units ``indices``. Every replicate draws the units once and scores all k on them: paired."""

    def statistic(indices: np.ndarray) -> np.ndarray:
        return np.array([score(indices) for score in scores], float)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample where a metric is undefined gives NaN, left out
        point = statistic(np.arange(len(strata)))
        distribution = bootstrap_distribution(statistic, strata, n_resamples, seed)
    return point, distribution.reshape(n_resamples, len(scores))


# ------------------------------------------------------------------------------------ calibration


def config_calibration(
    configuration: Configuration, pooled: dict[int, pd.DataFrame], horizon: float, plots: PlotConfig
) -> tuple[dict[str, float], dict[str, Any]]:
    """(scalars averaged over seeds, diagram data of the first seed) of one configuration; empty for
    regression."""
    task = configuration.runs[0].task
    per_seed, diagram = [], {}
    for seed in configuration.seeds:
        if task.name == "classification":
            rows = pooled[seed]
            y = class_indices([class_key(v) for v in rows["target"]], task.classes)
            proba = task.probabilities(rows)
            per_seed.append(calibration.classification_calibration(y, proba, plots.calibration_bins))
            if not diagram:
                event, p, what = calibration.reliability_pairs(y, proba)
                table = calibration.reliability_table(event, p, plots.calibration_bins)
                diagram = {"seed": seed, "what": what, "table": table.to_dict("records")}
        elif task.name == "survival":
            own, at_horizon = survival_predictions(configuration.seed_runs(seed), horizon)
            if own is None:
                continue
            d_cal = calibration.d_calibration(own["survival"], own["event"].astype(bool))
            per_seed.append({"d_calibration_chi2": d_cal["statistic"], "d_calibration_p": d_cal["p_value"]})
            if not diagram:
                table = calibration.km_calibration(
                    at_horizon["time"], at_horizon["event"], at_horizon["survival"], horizon, SURVIVAL_GROUPS
                )
                diagram = {
                    "seed": seed,
                    "horizon": horizon,
                    "d_calibration": d_cal,
                    "table": table.to_dict("records"),
                }
    if not per_seed:
        return {}, diagram
    frame = pd.DataFrame(per_seed)
    scalars = {c: float(frame[c].mean()) for c in frame.columns}
    if "d_calibration_p" in frame:
        scalars["d_calibration_p"] = float(frame["d_calibration_p"].median())  # p-values are not averaged
    return scalars, diagram


def survival_predictions(runs: list[Run], horizon: float) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Per test bag of a seed's runs: predicted survival at its own follow-up time and at ``horizon``
    (each fold's curves from its own fitted task; a bag tested in several folds gets the mean)."""
    frames = []
    for run in runs:
        test, train = run.test.reset_index(drop=True), run.train
        time = test["time"].to_numpy(float)
        own = calibration.predicted_survival(run.task, test, train, time)
        at = calibration.predicted_survival(run.task, test, train, np.full(len(test), horizon))
        if own is None or at is None:
            return None, None
        frames.append(
            pd.DataFrame(
                {"slide_id": test["slide_id"], "time": time, "event": test["event"], "own": own, "at": at}
            )
        )
    table = pd.concat(frames).groupby("slide_id", sort=True).mean()
    own = table[["time", "event", "own"]].rename(columns={"own": "survival"})
    at = table[["time", "event", "at"]].rename(columns={"at": "survival"})
    return own, at


# ------------------------------------------------------------------------------------- comparison


def fold_scores(config: Configuration) -> dict[int, np.ndarray]:
    """The main metric of every run on its own test bags: fold -> scores of the seeds."""
    scores: dict[int, list[float]] = {}
    for run in config.runs:
        scores.setdefault(run.fold, []).append(run.task.main_score(run.test))
    return {fold: np.asarray(values, float) for fold, values in sorted(scores.items())}


def undefined_folds_left_out(task: Task, by_fold: dict[str, dict[int, np.ndarray]]) -> int:
    """How many folds a mean over folds holds: a fold whose main metric is undefined for every run (no
    comparable pair in its test part: the patients decide, not the model) is left out by
    :func:`main_statistic`, with a warning naming it here."""
    scores = next(iter(by_fold.values()))
    missing = [fold for fold, values in scores.items() if not np.isfinite(values).any()]
    if missing:
        log.warning(
            "%s is undefined in fold %s (too few events or comparable pairs in its test part): compared as "
            "the mean over %d of %d folds",
            task.main_metric, ", ".join(map(str, missing)), len(scores) - len(missing), len(scores),
        )  # fmt: skip
    return len(scores) - len(missing)


def load_configurations(run_paths: list[str | os.PathLike]) -> list[Configuration]:
    """The configurations of the runs found under ``run_paths``, checked to share patients and folds."""
    configurations = group_configurations([read_run(p) for p in find_runs(run_paths)])
    check_same_patients(configurations)
    return configurations


def compare(configurations: list[Configuration], config: EvaluateConfig, plots: PlotConfig) -> dict[str, Any]:
    """Every statistic of the comparison as plain data (what ``comparison.json`` holds, without plots)."""
    task = configurations[0].runs[0].task
    pooled = {c.label: {s: c.pooled(s) for s in c.seeds} for c in configurations}
    reference = pooled[configurations[0].label][configurations[0].seeds[0]]
    for label, tables in pooled.items():  # the paired statistic indexes every table by the same rows
        if any(
            not np.array_equal(t["slide_id"].to_numpy(), reference["slide_id"].to_numpy())
            for t in tables.values()
        ):
            raise PathmilError(f"{label}: pooled test bags differ from {configurations[0].label}'s")
    patients = Patients.of(task, reference)

    def scorer(c: Configuration):
        tables, score_task = list(pooled[c.label].values()), c.runs[0].task
        return lambda idx: float(
            np.mean([main_statistic(score_task, t.iloc[patients.bag_rows(idx)]) for t in tables])
        )

    point, distribution = paired_bootstrap(
        [scorer(c) for c in configurations], patients.strata, config.n_bootstrap, config.seed
    )
    by_fold = {c.label: fold_scores(c) for c in configurations}
    # a fixed test set scored by every fold is one group (pool_test): its statistic is pooled, as evaluate's
    statistic = FOLD_MEAN if fold_wise(task) and reference["fold"].nunique() > 1 else "pooled"
    folds_used = undefined_folds_left_out(task, by_fold) if statistic == FOLD_MEAN else None
    runs = {label: np.concatenate(list(scores.values())) for label, scores in by_fold.items()}
    finite = np.concatenate(list(runs.values()))
    finite = finite[np.isfinite(finite)]
    thresholds = np.linspace(finite.min(), finite.max(), PROFILE_POINTS) if len(finite) else np.zeros(1)
    horizon = float(np.median(reference["time"])) if task.name == "survival" else math.nan

    rows, profiles, diagrams = [], {}, {}
    for j, c in enumerate(configurations):
        ci = percentile_interval(distribution[:, j], config.confidence)
        iqm_ci = iqm_interval(runs[c.label], config.n_bootstrap, config.confidence, config.seed)
        scalars, diagrams[c.label] = config_calibration(c, pooled[c.label], horizon, plots)
        rows.append(
            {
                "task": task.name,
                "configuration": c.label,
                "encoder": c.encoder,
                "aggregator": c.aggregator,
                "n_seeds": len(c.seeds),
                "n_folds": len(c.folds),
                "n_runs": len(c.runs),
                "n_patients": len(patients.rows),
                "metric": task.main_metric,
                "value": float(point[j]),
                "ci_low": ci[0],
                "ci_high": ci[1],
                "iqm": iqm(runs[c.label]),
                "iqm_low": iqm_ci[0],
                "iqm_high": iqm_ci[1],
                **scalars,
            }
        )
        profile = performance_profile(
            runs[c.label], thresholds, config.n_bootstrap, config.confidence, config.seed
        )
        profiles[c.label] = profile.to_dict("records")

    pairs = []
    for i, j in itertools.permutations(range(len(configurations)), 2):
        a, b = configurations[i].label, configurations[j].label
        ci = percentile_interval(distribution[:, i] - distribution[:, j], config.confidence)
        p = probability_of_improvement(by_fold[a], by_fold[b])
        difference = float(point[i] - point[j])
        pairs.append(
            {
                "a": a,
                "b": b,
                "difference": difference,
                "ci_low": ci[0],
                "ci_high": ci[1],
                "p_improvement": p,
                "significant": bool(all(math.isfinite(v) for v in ci) and (ci[0] > 0 or ci[1] < 0)),
                "verdict": verdict(a, b, task.name, difference, ci, p),
            }
        )
    return {
        "task": task.name,
        "main_metric": task.main_metric,
        "statistic": statistic,
        "folds": len(configurations[0].folds),
        "folds_used": folds_used,  # of a mean over folds: the folds whose metric is defined
        "evaluate": config.to_dict(),
        "n_patients": len(patients.rows),
        "horizon": horizon,
        "configurations": rows,
        "pairs": pairs,
        "verdicts": unique_verdicts(pairs),
        "profiles": profiles,
        "calibration": diagrams,
        "runs": {c.label: [str(r.path) for r in c.runs] for c in configurations},
    }


def unique_verdicts(pairs: list[dict[str, Any]]) -> list[str]:
    """One verdict per unordered pair (the winner first where there is one)."""
    lines, seen = [], set()
    for pair in pairs:
        key = frozenset((pair["a"], pair["b"]))
        if key not in seen:
            seen.add(key)
            lines.append(pair["verdict"])
    return lines


def compare_runs(
    run_paths: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: EvaluateConfig | None = None,
    plots: PlotConfig | None = None,
) -> dict[str, Any]:
    """Compare the configurations of the given runs (run folders, or folders of them) of one task.

    Writes to ``out_dir``: ``comparison.csv`` (one row per configuration: main metric with its interval,
    IQM with its interval, calibration), ``pairs.csv`` (every ordered pair A, B: difference A - B with
    its paired interval, P(A > B), whether the interval excludes zero, the verdict), ``verdicts.txt``
    (one line per pair), ``comparison.json`` (all of it, with the performance profiles and calibration
    tables), ``plots/*.png`` and ``comparison.html`` (the report's page,
    :func:`pathmil.evaluation.report.comparison_page`). Returns what ``comparison.json`` holds. Settings:
    ``n_bootstrap``, ``confidence`` and ``seed`` of ``config``; ``calibration_bins`` and ``time_unit`` of ``plots``.
    """
    config, plots = config or EvaluateConfig(), plots or PlotConfig()
    configurations = load_configurations(run_paths)
    log.info("comparing %s", ", ".join(f"{c.label} ({len(c.runs)} runs)" for c in configurations))
    result = compare(configurations, config, plots)
    out_dir = Path(out_dir)
    for name, key in (("comparison.csv", "configurations"), ("pairs.csv", "pairs")):
        with atomic_output(out_dir / name) as tmp:
            pd.DataFrame(result[key]).to_csv(tmp, index=False)
    with atomic_output(out_dir / "verdicts.txt") as tmp:
        tmp.write_text("".join(f"{line}\n" for line in result["verdicts"]))
    from pathmil.evaluation.plots import write_comparison_plots  # lazy: matplotlib
    from pathmil.evaluation.report import comparison_page, write_page

    result["plots"] = write_comparison_plots(result, out_dir, config, plots)
    write_page(out_dir / "comparison.html", comparison_page(result, out_dir))
    write_json(out_dir / "comparison.json", result)
    return result
