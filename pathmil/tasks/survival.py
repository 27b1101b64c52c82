"""Survival prediction from censored follow-up: discrete-time NLL over quantile bins, or Cox partial likelihood.

Discrete time (Zadeh and Schmid, "Bias in cross-entropy-based training of deep survival networks", IEEE
TPAMI 2020; used by MCAT (Chen et al., ICCV 2021), MambaMIL and MHIM-MIL): follow-up is cut into
``n_bins`` intervals at the quantiles of the *uncensored* training times (the outer edges open, 0 and
+inf); the model outputs one hazard logit per interval. Cox (Cox 1972; DeepSurv, Katzman et al. 2018): the
model outputs one log relative risk and the loss is the negative partial log-likelihood over the bags of a
batch, with Breslow's handling of tied times.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from pathmil.errors import PathmilError
from pathmil.settings import Settings
from pathmil.tasks.base import Task, bag_ids, full_precision, numeric_column, quantile_strata
from pathmil.tasks.metrics import harrell_c_index, survival_metrics, time_dependent_auc

log = logging.getLogger(__name__)


def nll_survival_loss(
    logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor, alpha: float = 0.0, eps: float = 1e-7
) -> torch.Tensor:
    """Discrete-time negative log-likelihood (Zadeh and Schmid 2020), averaged over bags.

    h = sigmoid(logits) are the hazards of the bins, S_j = prod_{i<=j} (1 - h_i) and S_pad = [1, S]. A bag
    whose event falls in bin y contributes -[log S_pad[y] + log h_y] (it survived the earlier bins and had
    the event in bin y); a bag censored in bin y contributes -log S_pad[y + 1] (it survived bin y).
    ``alpha`` adds weight to the uncensored term, L = (1 - alpha) L_all + alpha L_uncensored, as MCAT's
    code does; alpha = 0 is the plain likelihood. Probabilities are clamped at ``eps`` before the log.
    """
    hazards = torch.sigmoid(logits)
    survival = torch.cumprod(1 - hazards, dim=1)
    s_pad = torch.cat([torch.ones_like(survival[:, :1]), survival], dim=1)
    y = bins.long().reshape(-1, 1)
    censored = 1 - events.to(logits.dtype).reshape(-1, 1)
    s_before = s_pad.gather(1, y).clamp(min=eps)
    h_event = hazards.gather(1, y).clamp(min=eps)
    s_after = s_pad.gather(1, y + 1).clamp(min=eps)
    uncensored_loss = -(1 - censored) * (torch.log(s_before) + torch.log(h_event))
    censored_loss = -censored * torch.log(s_after)
    loss = (1 - alpha) * (censored_loss + uncensored_loss) + alpha * uncensored_loss
    return loss.mean()


def cox_loss(log_risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow ties, averaged over the events of the batch.

    -1/n_events sum_{i: event} [eta_i - log sum_{j: t_j >= t_i} exp(eta_j)]: every bag whose time is at
    least t_i, tied times included, is in the risk set of bag i. Computed in O(B log B) by a log-cumsum-exp
    over the bags sorted by decreasing time. A batch without events gives 0 that still has a gradient
    (of zeros), so a training loop can always call ``backward``.
    """
    eta = log_risk.reshape(-1)
    times = times.reshape(-1).to(eta.device).contiguous()
    events = events.reshape(-1).to(eta.device).bool()
    if not events.any():
        return eta.sum() * 0.0
    order = torch.argsort(times, descending=True)
    log_cumsum = torch.logcumsumexp(eta[order], dim=0)
    ascending = torch.flip(times[order], dims=[0]).contiguous()
    at_risk = len(times) - torch.searchsorted(ascending, times, side="left")  # count of t_j >= t_i
    log_partial = eta - log_cumsum[at_risk - 1]
    return -log_partial[events].sum() / events.sum()


class SurvivalTask(Task):
    """Survival from (time, event) labels; ``score`` is a risk (higher = worse prognosis).

    Settings: ``loss`` "nll" (discrete time) or "cox"; ``n_bins`` (4, as MambaMIL and MHIM-MIL);
    ``alpha`` (0.0: the unbiased likelihood of Zadeh and Schmid 2020 and the default of MCAT's
    ``--alpha_surv``; SurvPath and Path-PKT use 0.5); ``eps`` (1e-7) clamps probabilities in the NLL.
    """

    name = "survival"
    main_metric = "c_index"
    fold_wise_metrics = ("c_index", "c_index_ipcw", "td_auc")
    default_columns = ("time", "event")

    class Options(Settings):
        """Options of the survival task."""

        section = "task_options"
        loss: Literal["nll", "cox"] = Field(
            "nll",
            description="nll (discrete-time likelihood over time bins) or cox (partial likelihood over the "
            "bags of one optimiser step: set train.accumulation, e.g. 32)",
        )
        n_bins: int = Field(4, ge=1, description="time bins of the nll loss (quantiles of event times)")
        alpha: float = Field(0.0, ge=0, le=1, description="weight of the uncensored term in the nll loss")
        eps: float = Field(1e-7, gt=0, lt=1, description="clamp of probabilities in the nll loss")

    def __init__(self, target: str | list[str] | None = None, **options: Any):
        super().__init__(target, **options)
        o = self.options
        self.loss_name, self.n_bins, self.alpha, self.eps = o.loss, o.n_bins, o.alpha, o.eps
        self.edges: np.ndarray = np.zeros(0)  # inner bin edges; bins are [0, e1), [e1, e2), ..., [e_k, inf)

    @property
    def time_column(self) -> str:
        return self.label_columns[0]

    @property
    def event_column(self) -> str:
        return self.label_columns[1]

    @property
    def n_outputs(self) -> int:
        self._require_fitted()
        return 1 if self.loss_name == "cox" else len(self.edges) + 1

    # ------------------------------------------------------------------------------------- labels

    def _time_event(
        self, labels: pd.DataFrame, columns: tuple[str, str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Follow-up times (>= 0) and event flags (0/1) of every bag; bad values name the bag."""
        if columns is None:
            self._require_columns(labels)
        time_col, event_col = columns or (self.time_column, self.event_column)
        time = numeric_column(labels, time_col, "follow-up time")
        event = numeric_column(labels, event_col, "event flag")
        ids = bag_ids(labels)
        negative = time < 0
        if negative.any():
            raise PathmilError(
                f"slide {ids[negative.argmax()]}: follow-up time in column '{time_col}' is "
                f"{time[negative.argmax()]:g}; it must be >= 0 (follow-up time)"
            )
        bad = ~np.isin(event, (0.0, 1.0))
        if bad.any():
            raise PathmilError(
                f"slide {ids[bad.argmax()]}: event in column '{event_col}' is {event[bad.argmax()]:g}; "
                "it must be 1 (event observed) or 0 (censored)"
            )
        return time, event.astype(bool)

    def check_labels(self, labels: pd.DataFrame) -> None:
        """Valid times and event flags, and at least one observed event."""
        _, event = self._time_event(labels)
        if not event.any():
            raise PathmilError(
                f"no bag has an event (column '{self.event_column}' is all 0 in {len(event)} bag(s)); "
                "survival needs observed events"
            )

    def fold_needs(self, labels: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
        """An observed event: a test part without one has no comparable pair, so no c-index."""
        _, event = self._time_event(labels)
        return [(f"an event (column '{self.event_column}' is 1)", event)]

    def _bins(self, time: np.ndarray) -> np.ndarray:
        """Bin of each time: the number of inner edges at or below it (bins are closed on the left)."""
        return np.searchsorted(self.edges, time, side="right")

    # ---------------------------------------------------------------------------------- training

    def fit(self, labels: pd.DataFrame) -> None:
        """Bin edges at the quantiles of the uncensored training times (as MCAT's ``pd.qcut``)."""
        self.check_labels(labels)
        time, event = self._time_event(labels)
        quantiles = np.quantile(time[event], np.linspace(0, 1, self.n_bins + 1))[1:-1]
        self.edges = np.unique(quantiles)
        if len(self.edges) + 1 < self.n_bins and self.loss_name == "nll":
            log.warning(
                "only %d distinct survival bins (of %d asked) from %d event time(s) in the training bags",
                len(self.edges) + 1,
                self.n_bins,
                int(event.sum()),
            )
        self.fitted = True

    def targets(self, labels: pd.DataFrame) -> torch.Tensor:
        """(n_bags, 3): bin index, event flag (1 = observed), follow-up time."""
        self._require_fitted()
        time, event = self._time_event(labels)
        columns = np.column_stack([self._bins(time), event, time])
        return torch.as_tensor(columns, dtype=torch.float32)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = full_precision(logits), targets.to(logits.device)
        if self.loss_name == "cox":
            return cox_loss(logits[:, 0], targets[:, 2], targets[:, 1])
        return nll_survival_loss(logits, targets[:, 0], targets[:, 1], self.alpha, self.eps)

    # -------------------------------------------------------------------------------- prediction

    def predict(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """``score``: the risk (NLL: -sum_j S_j; Cox: the log relative risk). NLL adds ``surv_<j>``, the
        survival probability at the end of bin j (bin j ends at edge j + 1; the last bin never ends)."""
        logits = logits.detach().double().cpu()
        if self.loss_name == "cox":
            return {"score": logits[:, 0].numpy()}
        survival = torch.cumprod(1 - torch.sigmoid(logits), dim=1).numpy()
        out = {"score": -survival.sum(axis=1)}
        out.update({f"surv_{j}": survival[:, j] for j in range(survival.shape[1])})
        return out

    def target_columns(self, labels: pd.DataFrame) -> dict[str, np.ndarray]:
        time, event = self._time_event(labels)
        return {"time": time, "event": event.astype(np.int64)}

    def survival_function(self, test: pd.DataFrame, train: pd.DataFrame | None = None) -> Any | None:
        """``f(times) -> (n_test, len(times))`` survival probabilities of the test rows, or None.

        NLL: the step function of the discrete curve, S(t) = S_pad[bin(t)] (1 in the first bin, S_j from
        the end of bin j). Cox: a Breslow baseline fitted on the training rows' risks and outcomes
        (scikit-survival's ``BreslowEstimator``); None without training rows.
        """
        if self.loss_name == "nll":
            columns = [f"surv_{j}" for j in range(self.n_outputs)]
            if not set(columns) <= set(test.columns):
                return None  # pooled folds with different bins carry no comparable curves
            surv = test[columns].to_numpy(dtype=float)
            s_pad = np.column_stack([np.ones(len(surv)), surv])
            return lambda times: s_pad[:, self._bins(np.asarray(times))]
        if train is None:
            return None
        train_time, train_event = self._time_event(train, ("time", "event"))
        from sksurv.linear_model.coxph import BreslowEstimator

        baseline = BreslowEstimator().fit(train["score"].to_numpy(dtype=float), train_event, train_time)
        functions = baseline.get_survival_function(test["score"].to_numpy(dtype=float))
        return lambda times: np.vstack([fn(np.asarray(times)) for fn in functions])

    def metrics(self, test: pd.DataFrame, train: pd.DataFrame | None = None) -> dict[str, float]:
        """Harrell's c-index, Uno's IPCW c-index, mean time-dependent AUC, integrated Brier score.

        ``train`` (the training rows of the same fold, with ``time``, ``event`` and for Cox ``score``)
        gives the censoring distribution, the time range and the Cox baseline; without it the censoring
        distribution comes from the test rows and the Cox integrated Brier score is NaN.
        """
        self._require_fitted()
        time, event = self._time_event(test, ("time", "event"))
        train_time = train_event = None
        if train is not None:
            train_time, train_event = self._time_event(train, ("time", "event"))
        return survival_metrics(
            time,
            event,
            test["score"].to_numpy(dtype=float),
            train_time,
            train_event,
            self.survival_function(test, train),
        )

    def main_score(self, test: pd.DataFrame) -> float:
        """Harrell's c-index alone (it needs no training rows)."""
        time, event = self._time_event(test, ("time", "event"))
        return harrell_c_index(time, event, test["score"].to_numpy(dtype=float))

    def auc_curve(self, test: pd.DataFrame, train: pd.DataFrame | None = None) -> pd.DataFrame:
        """The time-dependent AUC at each evaluation time (columns ``time``, ``auc``), for plots."""
        time, event = self._time_event(test, ("time", "event"))
        train_time = train_event = None
        if train is not None:
            train_time, train_event = self._time_event(train, ("time", "event"))
        times, auc, _ = time_dependent_auc(
            time, event, test["score"].to_numpy(dtype=float), train_time, train_event
        )
        return pd.DataFrame({"time": times, "auc": auc})

    def stratify_labels(self, labels: pd.DataFrame, n_bins: int = 4) -> np.ndarray:
        """Event (0/1) x follow-up-time quantile bin: 2 * time_bin + event, so 2 x ``n_bins`` strata."""
        time, event = self._time_event(labels)
        return 2 * quantile_strata(time, n_bins) + event.astype(np.int64)

    def instance_saliency(self, logits: torch.Tensor) -> torch.Tensor:
        """How strongly an instance alone points to an early event, in [0, 1], monotone in its risk.

        NLL: 1 - mean_j S_j, the mean probability of an event by the end of each bin (an affine map of the
        risk -sum_j S_j onto [0, 1]); Cox: sigmoid of the log relative risk. MHIM-MIL's hard mining masks
        the instances that drive the prediction; for prognosis those are the high-risk ones, as the
        positive-class instances are for a detection task. Only the ranking matters for top-k masking,
        and a value in [0, 1] reads like the classification probability in heatmaps.
        """
        if self.loss_name == "cox":
            return torch.sigmoid(logits[..., 0])
        survival = torch.cumprod(1 - torch.sigmoid(logits), dim=-1)
        return 1 - survival.mean(dim=-1)

    # ---------------------------------------------------------------------------------- checkpoint

    def output_meaning(self) -> tuple[Any, ...]:
        """A Cox log-risk, or hazards of ``n_bins`` time bins (the bins are quantiles of each cohort's event
        times: output k means the k-th quantile interval wherever the model was trained)."""
        return (self.name, f"{self.options.loss} loss", f"{self.n_outputs} outputs")

    def _fitted_state(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist()}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.edges = np.asarray(state["edges"], dtype=np.float64)
