"""Hyperparameter search inside one cross-validation fold, with Optuna (Akiba et al., KDD 2019).

Nested correctly: every trial trains on the fold's training part and is scored on its validation part;
the fold's test part is never read (``train(..., parts=("train", "val"))``), so a test fold never informs
its own settings. The best trial's settings then train the fold's final model, which alone meets the test
bags. The study lives in an Optuna journal file, so a killed search resumes where it stopped and several
jobs (SLURM too, on a shared filesystem) can add trials to one study. The sampler is seeded (TPE), so a
search repeats.

The space is declared as dotted setting names (those of ``pathmil train``: ``lr``, ``model.dropout``,
``mhim.high_ratio``) with a distribution each; a name the aggregator does not read is left out of its
search (``mhim.*`` only for MHIM-MIL, ``model.X`` only where the aggregator's settings have X).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field, model_validator

from pathmil.errors import PathmilError
from pathmil.fileio import atomic_output
from pathmil.models.registry import model_entry
from pathmil.settings import Settings
from pathmil.training.run import TrainConfig

log = logging.getLogger(__name__)


class Distribution(Settings):
    """One searched setting: a float or int range (``log`` for a log scale) or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(description="float, int or categorical")
    low: float | None = Field(None, description="lowest value (float, int)")
    high: float | None = Field(None, description="highest value (float, int)")
    log: bool = Field(False, description="sample on a log scale (float, int)")
    choices: list[Any] | None = Field(None, description="the values to choose from (categorical)")

    @model_validator(mode="after")
    def _complete(self) -> Distribution:
        if self.type == "categorical" and not self.choices:
            raise ValueError("a categorical distribution needs choices")
        if self.type != "categorical" and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError(f"a {self.type} distribution needs low <= high")
        if self.log and self.type != "categorical" and (self.low or 0) <= 0:
            raise ValueError("a log-scale distribution needs low > 0")
        return self


DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "max_instances": {"type": "categorical", "choices": [None, 512, 2048]},
    "mhim.high_ratio": {"type": "float", "low": 0.005, "high": 0.1, "log": True},
    "mhim.merge_ratio": {"type": "float", "low": 0.5, "high": 1.0},
    "model.sr_rate": {"type": "categorical", "choices": [2, 5, 10]},
}


class SearchConfig(Settings):
    """A hyperparameter search per fold (``search`` section): how many trials over which space."""

    section = "search"
    n_trials: int = Field(0, ge=0, description="trials per fold; 0: no search (the settings as given)")
    space: dict[str, Distribution] = Field(
        default_factory=lambda: {k: Distribution(**v) for k, v in DEFAULT_SPACE.items()},
        description="dotted train setting -> distribution (lr, model.dropout, max_instances, mhim.*, ...)",
    )
    jobs: int = Field(1, ge=1, description="workflow: search jobs per fold adding trials to one study")


def applicable(space: dict[str, Distribution], config: TrainConfig) -> dict[str, Distribution]:
    """The part of ``space`` the run's aggregator reads."""
    entry = model_entry(config.aggregator)
    keep = {}
    for name, distribution in space.items():
        section, _, key = name.rpartition(".")
        if section == "mhim" and "mhim" not in entry.inputs:
            continue
        if section == "model" and key not in entry.settings.model_fields:
            continue
        if section not in ("", "model", "mhim"):
            raise PathmilError(f"search.space: '{name}' is not a train setting (use lr, model.X or mhim.X)")
        if not section and key not in TrainConfig.model_fields:
            raise PathmilError(f"search.space: unknown train setting '{name}'")
        keep[name] = distribution
    return keep


def suggest(trial: Any, space: dict[str, Distribution]) -> dict[str, Any]:
    """The trial's values as nested settings (``{"model": {"dropout": 0.1}, "lr": 3e-4}``)."""
    nested: dict[str, Any] = {}
    for name, d in space.items():
        if d.type == "float":
            value: Any = trial.suggest_float(name, d.low, d.high, log=d.log)
        elif d.type == "int":
            value = trial.suggest_int(name, int(d.low), int(d.high), log=d.log)
        else:
            value = trial.suggest_categorical(name, d.choices)
        node = nested
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def search_fold(
    config: TrainConfig,
    search: SearchConfig,
    features_dir: str | os.PathLike,
    cohort: str | os.PathLike,
    splits: str | os.PathLike,
    fold: int,
    out_dir: str | os.PathLike,
    n_trials: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study of one fold; write ``best.yaml`` (a ``train:`` section) and ``trials.csv``.

    ``n_trials`` adds that many trials in this call (0: none, only the summary; several jobs may share the
    study); None tops the study up to ``search.n_trials`` completed trials (a killed search resumes).
    Returns the best trial's settings and its validation value of the task's main metric.

    Raises:
        PathmilError: a fold without a validation part, or a space naming unknown settings.
    """
    import optuna
    import yaml
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from pathmil.config import deep_merge
    from pathmil.training.fit import train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    space = applicable(search.space, config)
    storage = JournalStorage(JournalFileBackend(str(out_dir / "study.journal")))
    sampler = optuna.samplers.TPESampler(seed=config.seed * 1000 + fold)
    study = optuna.create_study(
        study_name="pathmil", storage=storage, sampler=sampler, direction="maximize", load_if_exists=True
    )
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    to_add = max(0, search.n_trials - done) if n_trials is None else n_trials

    def objective(trial: optuna.Trial) -> float:
        settings = TrainConfig.build(deep_merge(config.to_dict(), suggest(trial, space)), "search trial")
        run = out_dir / "trials" / f"trial{trial.number}"
        summary = train(
            settings, features_dir, cohort, splits, fold, run, progress=False, parts=("train", "val")
        )
        shutil.rmtree(run, ignore_errors=True)
        metric = summary["main_metric"]
        value = summary["metrics"].get("val", {}).get(metric, math.nan)
        if not math.isfinite(value):
            raise PathmilError(
                f"fold {fold} of {splits} has no validation part to search on (set split.val_frac > 0)"
            )
        log.info("trial %d: val %s %.4f with %s", trial.number, metric, value, trial.params)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if to_add:
        study.optimize(objective, n_trials=to_add, catch=())
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise PathmilError(f"the study in {out_dir} has no finished trial yet; run the search first")
    best = study.best_trial
    best_settings = suggest(optuna.trial.FixedTrial(best.params), space)
    with atomic_output(out_dir / "best.yaml") as tmp:
        tmp.write_text(yaml.safe_dump({"train": best_settings}, sort_keys=True))
    with atomic_output(out_dir / "trials.csv") as tmp:
        pd.DataFrame(study.trials_dataframe()).to_csv(tmp, index=False)
    return {"settings": best_settings, "value": best.value, "trials": len(study.trials)}
