"""The contract every learning task keeps (../DESIGN.md): labels in, targets, loss, scores and metrics out.

A task turns the label columns of a cohort table (one row per bag: a slide, or a patient whose slides are
joined) into what a loss needs, and a model's ``logits (B, n_outputs)`` back into prediction columns
(``score`` and friends) and metrics. Models know nothing of tasks: they output ``task.n_outputs`` numbers
per bag. Whatever a task learns from labels (the class list, survival bins, target scaling) it learns in
:meth:`Task.fit` from the training bags of one fold only, so validation and test labels never leak into
training; :meth:`Task.state_dict` carries that state into checkpoints.

Life cycle: ``task = create_task("survival", loss="nll")``; ``task.fit(train_labels)``; build the model
with ``task.n_outputs``; ``task.loss(logits, task.targets(batch_labels))`` while training;
``task.predict(logits)`` and ``task.target_columns(labels)`` make the predictions table;
``task.metrics(test_rows, train_rows)`` scores it.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from pathmil.errors import PathmilError
from pathmil.settings import Settings


class Task(abc.ABC):
    """Base class of the three tasks: label-column naming, label checks and the checkpoint state.

    A task's settings (``task_options`` in configs) are declared once, in its ``Options`` class.
    """

    name: ClassVar[str]  # "classification" | "survival" | "regression"
    main_metric: ClassVar[str]  # higher is better; early stopping and model selection use it
    # metrics that rank a score whose scale each fold model sets for itself (a Cox log-risk is defined up
    # to a constant, an NLL risk by the fold's time bins): over folds, their mean, not their pooled value
    fold_wise_metrics: ClassVar[tuple[str, ...]] = ()
    default_columns: ClassVar[tuple[str, ...]]  # the demo cohort's label columns
    Options: ClassVar[type[Settings]]  # the task's settings

    def __init__(self, target: str | list[str] | None = None, **options: Any):
        self.label_columns: list[str] = self._columns(target)
        self.options = self.Options.build(options, "task_options")
        self.fitted = False

    # ------------------------------------------------------------------------------- to implement

    @property
    @abc.abstractmethod
    def n_outputs(self) -> int:
        """Numbers the model outputs per bag (valid after :meth:`fit`)."""

    def output_meaning(self) -> tuple[Any, ...]:
        """What the model's outputs mean, compared where weights pass from one run to another (a head
        loaded by ``train.init_from``, an MHIM-MIL teacher): equal tuples, outputs of the same meaning. The
        default, the task's name; classification adds its classes, survival its loss and time bins."""
        return (self.name,)

    def settings(self) -> dict[str, Any]:
        """The task's options (the constructor's keyword arguments without ``target``), as plain data."""
        return self.options.to_dict()

    @abc.abstractmethod
    def fit(self, labels: pd.DataFrame) -> None:
        """Learn the task's state from the training bags of one fold (one row per bag)."""

    @abc.abstractmethod
    def targets(self, labels: pd.DataFrame) -> torch.Tensor:
        """(n_bags, k) float tensor with the encoding :meth:`loss` needs."""

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar loss of ``logits (B, n_outputs)``, averaged over the bags."""

    @abc.abstractmethod
    def predict(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """Prediction columns (always ``score``) for ``logits (B, n_outputs)``, one value per bag."""

    @abc.abstractmethod
    def target_columns(self, labels: pd.DataFrame) -> dict[str, np.ndarray]:
        """The label columns of the predictions table (``target``, or ``time`` and ``event``)."""

    @abc.abstractmethod
    def metrics(self, test: pd.DataFrame, train: pd.DataFrame | None = None) -> dict[str, float]:
        """Metrics over a predictions table (rows = bags, the columns of predict and target_columns)."""

    def main_score(self, test: pd.DataFrame) -> float:
        """The main metric of a predictions table, equal to ``metrics(test)[main_metric]``. Bootstrap
        comparisons call it thousands of times, so a task whose other metrics are slow computes it alone."""
        return self.metrics(test)[self.main_metric]

    @abc.abstractmethod
    def stratify_labels(self, labels: pd.DataFrame, n_bins: int = 4) -> np.ndarray:
        """Discrete strata (int per bag) for stratified splits and bootstrap; needs no :meth:`fit`."""

    def fold_needs(self, labels: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
        """What every fold's test part needs one bag of, as words and a mask over the bags (a class of a
        classification task); :func:`pathmil.data.splits.check_folds` refuses fewer patients than folds."""
        return []

    @abc.abstractmethod
    def instance_saliency(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., n_outputs) per-instance logits -> (...) saliency in [0, 1] (MHIM-MIL v2 instance score)."""

    @abc.abstractmethod
    def check_labels(self, labels: pd.DataFrame) -> None:
        """Raise a :class:`PathmilError` naming the bag and column of any missing or invalid label."""

    @abc.abstractmethod
    def _fitted_state(self) -> dict[str, Any]:
        """What :meth:`fit` learned, as plain data."""

    @abc.abstractmethod
    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_fitted_state` returned."""

    # ------------------------------------------------------------------------------------- shared

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this fitted task (see :func:`pathmil.tasks.task_from_state`)."""
        self._require_fitted()
        return {
            "name": self.name,
            "label_columns": list(self.label_columns),
            "settings": self.settings(),
            "fitted": self._fitted_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a fitted state saved by :meth:`state_dict` of a task of the same kind."""
        if state.get("name") != self.name:
            raise PathmilError(f"checkpoint holds a {state.get('name')} task, not {self.name}")
        if state["settings"] != self.settings():
            raise PathmilError(
                f"checkpoint's {self.name} task settings {state['settings']} differ from the configured "
                f"{self.settings()}; use the checkpoint's settings (task_from_state)"
            )
        self.label_columns = list(state["label_columns"])
        self._load_fitted_state(state["fitted"])
        self.fitted = True

    def _columns(self, target: str | list[str] | None) -> list[str]:
        """The label columns: the defaults, or those ``target`` names (a list, or text split at commas)."""
        if target is None:
            return list(self.default_columns)
        names = target.split(",") if isinstance(target, str) else list(target)
        names = [str(n).strip() for n in names]
        if len(names) != len(self.default_columns) or not all(names):
            raise PathmilError(
                f"the {self.name} task needs {len(self.default_columns)} label column name(s) like "
                f"{','.join(self.default_columns)}; got target {target!r}"
            )
        return names

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"the {self.name} task is not fitted: call fit(train_labels) first")

    def _require_columns(self, labels: pd.DataFrame) -> None:
        missing = [c for c in self.label_columns if c not in labels.columns]
        if missing:
            raise PathmilError(
                f"labels lack column '{missing[0]}' for the {self.name} task; add it to the cohort table "
                f"or name the right column with --target (columns: {', '.join(map(str, labels.columns))})"
            )
        if len(labels) == 0:
            raise PathmilError(f"no bags with labels for the {self.name} task")


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in at least float32: losses take logs of small probabilities, which half precision
    (mixed-precision training on GPU) rounds to zero; float64 stays float64."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def bag_ids(labels: pd.DataFrame) -> np.ndarray:
    """How error messages name each row: ``slide_id`` if present, else the table's index."""
    if "slide_id" in labels.columns:
        return labels["slide_id"].astype(str).to_numpy()
    return labels.index.astype(str).to_numpy()


def numeric_column(labels: pd.DataFrame, column: str, what: str) -> np.ndarray:
    """Column ``column`` as float64; an empty or non-numeric cell is an error naming the bag."""
    raw = labels[column]
    ids = bag_ids(labels)
    missing = raw.isna().to_numpy()
    if missing.any():
        raise PathmilError(
            f"slide {ids[missing.argmax()]} has no {what} in column '{column}'; fill it in or drop the slide"
        )
    values = raw.astype(float) if raw.dtype == bool else pd.to_numeric(raw, errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        raise PathmilError(
            f"slide {ids[bad.argmax()]}: {what} in column '{column}' is {raw.iloc[bad.argmax()]!r}, "
            "not a number; fix the cohort table"
        )
    return values.to_numpy(dtype=np.float64)


def quantile_strata(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bins of (at most) ``n_bins`` equal counts by rank: always defined, even for tied or few values."""
    ranks = pd.Series(values).rank(method="first")
    q = max(1, min(n_bins, len(values)))
    return pd.qcut(ranks, q=q, labels=False).to_numpy(dtype=np.int64)
