"""Regression of a slide-level value, sTIL % by default (WeakSTIL, Schirris et al., SPIE MI 2022).

The model predicts the standardised target, (y - mean) / std with mean and std of the training bags: a
scale-free target keeps the loss, the learning rate and Huber's delta meaningful whatever the units, and the
last layer starts near the mean. Predictions are mapped back to the original units (%).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from pathmil.errors import PathmilError
from pathmil.settings import Settings
from pathmil.tasks.base import Task, bag_ids, full_precision, numeric_column, quantile_strata
from pathmil.tasks.metrics import regression_metrics


class RegressionTask(Task):
    """One output per bag, the standardised value; ``score`` is the prediction in original units.

    Settings: ``loss`` "mse" or "huber" (``huber_delta`` on the standardised scale, 1.0); ``threshold``
    (30 %) separates sTIL-high from sTIL-low for the ``auc_high`` metric; ``value_range`` ([0, 100]) is
    the range labels must lie in (null: any value).
    """

    name = "regression"
    main_metric = "r2"
    default_columns = ("stil",)

    class Options(Settings):
        """Options of the regression task."""

        section = "task_options"
        loss: Literal["mse", "huber"] = Field("mse", description="mse or huber")
        huber_delta: float = Field(1.0, gt=0, description="Huber's delta on the standardised scale")
        threshold: float = Field(
            30.0, description="value separating high from low (sTIL-high: 30 %) for auc_high"
        )
        value_range: tuple[float, float] | None = Field(
            (0.0, 100.0), description="[low, high] labels must lie in (sTIL %); null: any value"
        )

        @field_validator("value_range")
        @classmethod
        def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
            if value is not None and value[0] >= value[1]:
                raise ValueError(f"value_range must be [low, high] with low < high, got {list(value)}")
            return value

    def __init__(self, target: str | list[str] | None = None, **options: Any):
        super().__init__(target, **options)
        o = self.options
        self.loss_name, self.huber_delta, self.threshold = o.loss, o.huber_delta, o.threshold
        self.value_range = None if o.value_range is None else list(o.value_range)
        self.mean, self.std = 0.0, 1.0

    @property
    def column(self) -> str:
        return self.label_columns[0]

    @property
    def n_outputs(self) -> int:
        return 1

    # ------------------------------------------------------------------------------------- labels

    def _values(self, labels: pd.DataFrame, column: str | None = None) -> np.ndarray:
        """The target of every bag; empty, non-numeric or out-of-range values name the bag."""
        if column is None:
            self._require_columns(labels)
        column = column or self.column
        values = numeric_column(labels, column, "value")
        if self.value_range is not None:
            low, high = self.value_range
            bad = (values < low) | (values > high)
            if bad.any():
                raise PathmilError(
                    f"slide {bag_ids(labels)[bad.argmax()]}: value {values[bad.argmax()]:g} in column "
                    f"'{column}' is outside [{low:g}, {high:g}]; fix it (sTIL is a percentage) or set "
                    "task.value_range"
                )
        return values

    def check_labels(self, labels: pd.DataFrame) -> None:
        """Valid values, at least two distinct ones (a constant cannot be standardised or ranked), and not
        percentages given as fractions (all values within [0, 1] for a range up to 50 or more)."""
        values = self._varying_values(labels)
        if self.value_range is not None and self.value_range[1] >= 50 and values.max() <= 1:
            low, high = self.value_range
            raise PathmilError(
                f"column '{self.column}' lies within [0, 1] but the range is [{low:g}, {high:g}]: percentages "
                "given as fractions? multiply them by 100 (or set task_options.value_range)"
            )

    def _varying_values(self, labels: pd.DataFrame) -> np.ndarray:
        values = self._values(labels)
        if len(np.unique(values)) < 2:
            raise PathmilError(
                f"column '{self.column}' has the same value {values[0]:g} in all {len(values)} bag(s); "
                "regression needs varying targets"
            )
        return values

    # ---------------------------------------------------------------------------------- training

    def fit(self, labels: pd.DataFrame) -> None:
        """Mean and (population) standard deviation of the training targets."""
        values = self._varying_values(labels)
        self.mean, self.std = float(values.mean()), float(values.std())
        self.fitted = True

    def scale(self, values: np.ndarray) -> np.ndarray:
        """Original units -> the standardised scale the model predicts."""
        return (np.asarray(values, dtype=np.float64) - self.mean) / self.std

    def unscale(self, values: np.ndarray) -> np.ndarray:
        """The standardised scale -> original units."""
        return np.asarray(values, dtype=np.float64) * self.std + self.mean

    def targets(self, labels: pd.DataFrame) -> torch.Tensor:
        """(n_bags, 1): the standardised target."""
        self._require_fitted()
        return torch.as_tensor(self.scale(self._values(labels)), dtype=torch.float32)[:, None]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        prediction = full_precision(logits)[:, 0]
        target = targets[:, 0].to(prediction)
        if self.loss_name == "huber":
            return F.huber_loss(prediction, target, delta=self.huber_delta)
        return F.mse_loss(prediction, target)

    # -------------------------------------------------------------------------------- prediction

    def predict(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """``score``: the predicted value in original units (not clipped to ``value_range``)."""
        self._require_fitted()
        return {"score": self.unscale(logits.detach().double().cpu()[:, 0].numpy())}

    def target_columns(self, labels: pd.DataFrame) -> dict[str, np.ndarray]:
        return {"target": self._values(labels)}

    def metrics(self, test: pd.DataFrame, train: pd.DataFrame | None = None) -> dict[str, float]:
        """R^2, Pearson, Spearman, MAE, RMSE and the AUC of target >= threshold (sTIL-high)."""
        target = self._values(test, column="target")
        return regression_metrics(target, test["score"].to_numpy(dtype=float), self.threshold)

    def stratify_labels(self, labels: pd.DataFrame, n_bins: int = 4) -> np.ndarray:
        """Quantile bins of the value (quartiles by default)."""
        return quantile_strata(self._values(labels), n_bins)

    def instance_saliency(self, logits: torch.Tensor) -> torch.Tensor:
        """sigmoid of the standardised predicted value: in [0, 1], monotone in the instance's value.

        For sTIL the salient tiles are the lymphocyte-rich ones that raise the slide score (WeakSTIL's
        heatmaps show the high per-tile values); the standardisation centres the sigmoid on the training
        mean, so an average tile scores 0.5.
        """
        return torch.sigmoid(logits[..., 0])

    # ---------------------------------------------------------------------------------- checkpoint

    def _fitted_state(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])
