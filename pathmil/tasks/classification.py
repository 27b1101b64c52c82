"""Slide classification, binary or multi-class: softmax cross-entropy with optional class weights.

Labels may be numbers (0/1, grades) or text ("LUAD", "LUSC", "MESO"). The class list is learned from the
training bags and sorted (numerically when all labels are numbers), so logit ``c`` is always the ``c``-th
class of that list and, in a binary problem, the positive class is the second one (1 of 0/1, "LUSC" of
"LUAD"/"LUSC").
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from sklearn.utils.class_weight import compute_class_weight

from pathmil.errors import PathmilError
from pathmil.settings import Settings
from pathmil.tasks.base import Task, bag_ids, full_precision
from pathmil.tasks.metrics import classification_metrics, multiclass_auc


def class_key(value: Any) -> int | float | str:
    """A label as a plain, comparable value: integral numbers become ``int`` so 1, 1.0 and "1" agree."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return int(value) if float(value).is_integer() else float(value)
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else text


def sorted_classes(keys: list[int | float | str]) -> list[int | float | str]:
    """Distinct labels, in numeric order when all are numbers, else in text order."""
    distinct = set(keys)
    if all(isinstance(k, int | float) for k in distinct):
        return sorted(distinct)
    return sorted(distinct, key=str)


class ClassificationTask(Task):
    """Cross-entropy over ``n_classes`` logits; scores are softmax probabilities.

    ``class_weights``: None (plain cross-entropy), "balanced" (n / (C * count_c) on the training bags,
    scikit-learn's rule) or one weight per class in the sorted class order. The weighted loss is the mean
    over bags of w[y] * CE, not PyTorch's sum(w * CE) / sum(w): with one bag per loss call (MIL batches of
    one, gradient accumulation) the latter would cancel the weights.
    """

    name = "classification"
    main_metric = "auc"
    default_columns = ("label",)

    class Options(Settings):
        """Options of the classification task."""

        section = "task_options"
        class_weights: Literal["balanced"] | list[PositiveFloat] | None = Field(
            None, description="none (plain cross-entropy), balanced, or one positive weight per class"
        )

    def __init__(self, target: str | list[str] | None = None, **options: Any):
        super().__init__(target, **options)
        self.class_weights = self.options.class_weights
        self.classes: list[int | float | str] = []
        self.weights: list[float] | None = None

    @property
    def column(self) -> str:
        return self.label_columns[0]

    @property
    def n_outputs(self) -> int:
        self._require_fitted()
        return len(self.classes)

    # ------------------------------------------------------------------------------------- labels

    def _keys(self, labels: pd.DataFrame, column: str | None = None) -> list[int | float | str]:
        """The label of every bag (column ``column``, default the label column) as a class key; an
        empty label is an error naming the bag."""
        if column is None:
            self._require_columns(labels)
        column = column or self.column
        raw = labels[column]
        missing = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
        if missing.any():
            raise PathmilError(
                f"slide {bag_ids(labels)[missing.argmax()]} has no class in column '{column}'; "
                "fill it in or drop the slide"
            )
        return [class_key(v) for v in raw]

    def check_labels(self, labels: pd.DataFrame) -> None:
        """Every bag has a class, and there are at least two classes."""
        keys = self._keys(labels)
        distinct = sorted_classes(keys)
        if len(distinct) < 2:
            raise PathmilError(
                f"column '{self.column}' holds one class only ({distinct[0]!r}) in {len(keys)} bag(s); "
                "classification needs at least two"
            )

    def _indices(self, labels: pd.DataFrame, column: str | None = None) -> np.ndarray:
        """Class index of every bag; a class unseen in training is an error naming the bag."""
        self._require_fitted()
        lookup = {c: i for i, c in enumerate(self.classes)}
        keys = self._keys(labels, column)
        unknown = [i for i, k in enumerate(keys) if k not in lookup]
        if unknown:
            raise PathmilError(
                f"slide {bag_ids(labels)[unknown[0]]}: class {keys[unknown[0]]!r} in column '{column or self.column}' "
                f"is not among the training classes {self.classes}; every class needs training bags"
            )
        return np.array([lookup[k] for k in keys], dtype=np.int64)

    # ---------------------------------------------------------------------------------- training

    def fit(self, labels: pd.DataFrame) -> None:
        """Learn the sorted class list and the class weights from the training bags."""
        self.check_labels(labels)
        self.classes = sorted_classes(self._keys(labels))
        self.fitted = True
        self.weights = self._resolve_weights(self._indices(labels))

    def _resolve_weights(self, y_idx: np.ndarray) -> list[float] | None:
        n = len(self.classes)
        if self.class_weights is None:
            return None
        if self.class_weights == "balanced":
            return compute_class_weight("balanced", classes=np.arange(n), y=y_idx).tolist()
        if len(self.class_weights) != n:
            raise PathmilError(
                f"task.class_weights has {len(self.class_weights)} value(s) but there are {n} classes "
                f"{self.classes}; give one weight per class in this order"
            )
        return [float(w) for w in self.class_weights]

    def targets(self, labels: pd.DataFrame) -> torch.Tensor:
        """(n_bags, 1): the class index (as float, like the other tasks' targets)."""
        return torch.as_tensor(self._indices(labels), dtype=torch.float32)[:, None]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = targets[:, 0].long().to(logits.device)
        per_bag = F.cross_entropy(full_precision(logits), y, reduction="none")
        if self.weights is not None:
            per_bag = per_bag * torch.as_tensor(self.weights, dtype=per_bag.dtype, device=per_bag.device)[y]
        return per_bag.mean()

    # -------------------------------------------------------------------------------- prediction

    def predict(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """``score`` = P(classes[1]) for binary problems; for multi-class one ``score_<class>`` per class
        and ``score`` = the index of the predicted class (no single probability summarises C classes).
        ``prediction`` is the predicted class label in both cases."""
        proba = torch.softmax(logits.detach().float(), dim=-1).cpu().numpy()
        predicted = proba.argmax(axis=1)
        out: dict[str, np.ndarray] = {}
        if len(self.classes) == 2:
            out["score"] = proba[:, 1]
        else:
            out["score"] = predicted.astype(np.float64)
            for i, c in enumerate(self.classes):
                out[f"score_{c}"] = proba[:, i]
        out["prediction"] = np.asarray(self.classes, dtype=object)[predicted]
        return out

    def target_columns(self, labels: pd.DataFrame) -> dict[str, np.ndarray]:
        return {"target": np.asarray(self._keys(labels), dtype=object)}

    def probabilities(self, predictions: pd.DataFrame) -> np.ndarray:
        """(n, C) class probabilities from a predictions table's score columns."""
        if len(self.classes) == 2:
            score = predictions["score"].to_numpy(dtype=float)
            return np.column_stack([1 - score, score])
        return predictions[[f"score_{c}" for c in self.classes]].to_numpy(dtype=float)

    def metrics(self, test: pd.DataFrame, train: pd.DataFrame | None = None) -> dict[str, float]:
        """AUC (binary, or macro one-vs-rest), balanced accuracy, F1, accuracy, Brier score, ECE."""
        self._require_fitted()
        y = [self.classes[i] for i in self._indices(test, column="target")]
        return classification_metrics(y, self.probabilities(test), self.classes)

    def main_score(self, test: pd.DataFrame) -> float:
        """The AUC alone (binary, or macro one-vs-rest), as :meth:`metrics` computes it."""
        self._require_fitted()
        proba = self.probabilities(test)
        if len(test) == 0 or not np.isfinite(proba).all():
            return math.nan
        return multiclass_auc(self._indices(test, column="target"), proba)

    def stratify_labels(self, labels: pd.DataFrame, n_bins: int = 4) -> np.ndarray:
        """The class (as an integer code) of every bag."""
        keys = self._keys(labels)
        lookup = {c: i for i, c in enumerate(sorted_classes(keys))}
        return np.array([lookup[k] for k in keys], dtype=np.int64)

    def fold_needs(self, labels: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
        """Every class: a test part without one has no AUC of it."""
        keys = self._keys(labels)
        return [
            (f"class {c!r} in column '{self.column}'", np.array([k == c for k in keys]))
            for c in sorted_classes(keys)
        ]

    def instance_saliency(self, logits: torch.Tensor) -> torch.Tensor:
        """max_c softmax_c: MHIM-MIL v2's class-aware instance probability (Tang et al. 2025)."""
        return torch.softmax(logits, dim=-1).amax(dim=-1)

    # ---------------------------------------------------------------------------------- checkpoint

    def output_meaning(self) -> tuple[Any, ...]:
        """Output k is the logit of ``classes[k]``: another class list (or order) means other outputs."""
        self._require_fitted()
        return (self.name, tuple(str(c) for c in self.classes))

    def _fitted_state(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "weights": self.weights}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.classes = [class_key(c) for c in state["classes"]]
        self.weights = state["weights"]
