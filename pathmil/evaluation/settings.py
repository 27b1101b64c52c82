"""Settings of the evaluation stage: bootstrap confidence intervals (``evaluate``) and plots (``plots``),
shared by ``pathmil evaluate`` and ``pathmil compare``."""

from __future__ import annotations

from pydantic import Field

from pathmil.settings import Settings


class EvaluateConfig(Settings):
    """How runs are summarised: bootstrap confidence intervals over the pooled test predictions."""

    section = "evaluate"
    n_bootstrap: int = Field(1000, ge=0, description="bootstrap resamples; 0 turns confidence intervals off")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the confidence intervals")
    seed: int = Field(0, description="seed of the resampling")


class PlotConfig(Settings):
    """The evaluation plots written by ``pathmil evaluate``."""

    section = "plots"
    time_unit: str | None = Field(
        None,
        description="unit of the survival times in the cohort table, for axis labels (months, days, ...); "
        "none: the axis names the time column",
    )
    value_label: str | None = Field(
        None,
        description="axis label of the regression values (e.g. sTIL %); none: the target column, with % "
        "for a 0-100 value range",
    )
    dpi: int = Field(
        120, ge=30, description="pixels per inch of the PNGs (a 6 x 5 inch plot at 120 is 720 x 600 px)"
    )
    calibration_bins: int = Field(
        10, ge=2, description="equal-width probability bins of the reliability diagram"
    )
