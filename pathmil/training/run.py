"""A training run: its settings (:class:`TrainConfig`), how its model is built, and how a trained run is
loaded again (:func:`load_run`) for prediction, heatmaps, evaluation and MHIM-MIL's teacher.

As nanoGPT keeps its config beside the model, a checkpoint keeps the run's whole config beside the
weights, so a ``best.pt`` alone rebuilds the model and its fitted task. This module is the one place that
knows how; the training loop (:mod:`pathmil.training.fit`) and the evaluation stages both use it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from pathmil.device import mil_autocast_dtype, resolve_device
from pathmil.errors import PathmilError
from pathmil.models import MILModel, create_model
from pathmil.models.checkpoint import load_checkpoint
from pathmil.models.registry import model_entry
from pathmil.settings import Settings
from pathmil.tasks import TASKS, Task, task_from_state

log = logging.getLogger(__name__)


class TrainConfig(Settings):
    """One training run: task, aggregator and the explicit loop's settings (saved in every checkpoint)."""

    section = "train"
    task: Literal["classification", "survival", "regression"] = Field(
        "classification", description="the task"
    )
    target: list[str] | None = Field(
        None, description="label column(s); none: label | time, event | stil (the task's defaults)"
    )
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="the task's settings (e.g. loss, n_bins, class_weights)"
    )
    aggregator: str = Field("abmil", description="aggregator name (`pathmil models`)")
    model: dict[str, Any] = Field(default_factory=dict, description="the aggregator's settings")
    mhim: dict[str, Any] = Field(default_factory=dict, description="MHIM-MIL settings (mhim_* aggregators)")
    bag_level: Literal["patient", "slide"] = Field(
        "patient", description="patient: a patient's slides joined into one bag; slide: one bag per slide"
    )
    max_instances: int | None = Field(
        None, ge=1, description="sample at most this many instances per bag in training"
    )
    optimizer: Literal["adam", "adamw"] = Field("adamw", description="adam or adamw")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-5, ge=0, description="weight decay of the optimiser")
    epochs: int = Field(50, ge=1, description="maximum epochs")
    min_epochs: int = Field(10, ge=0, description="no early stop before this many epochs")
    patience: int = Field(10, ge=1, description="epochs without improvement of the validation main metric")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up, then cosine decay to zero")
    accumulation: int = Field(1, ge=1, description="bags per optimiser step (and per Cox loss)")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this")
    seed: int = Field(0, description="one seed for python, numpy and torch; CPU runs repeat exactly")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when a GPU is visible")
    amp: bool = Field(True, description="bf16 autocast on CUDA (the CPU always runs float32)")
    memory_budget_gb: float = Field(
        8.0, ge=0, description="keep all bags in memory when they fit in this much"
    )

    @model_validator(mode="after")
    def _nested_sections(self) -> TrainConfig:
        """The sections the aggregator and task read are checked against their own declarations."""
        entry = model_entry(self.aggregator)
        entry.settings.build(self.model, "model")
        if "mhim" in entry.inputs:
            from pathmil.models.mhim import MHIMConfig

            MHIMConfig.build(self.mhim, "mhim")
        elif self.mhim:
            log.warning("mhim settings are ignored: aggregator '%s' does not read them", self.aggregator)
        TASKS[self.task].Options.build(self.task_options, "task_options")
        return self


def build_model(config: TrainConfig, in_dim: int, task: Task) -> MILModel:
    """The aggregator named in ``config``, sized for the features and the task, with the inputs its
    registry entry declares (e.g. MHIM-MIL's ``mhim`` settings and the task's instance saliency)."""
    inputs = {"mhim": config.mhim, "saliency": task.instance_saliency}
    entry = model_entry(config.aggregator)
    wanted = {key: inputs[key] for key in entry.inputs}
    return create_model(config.aggregator, in_dim=in_dim, n_outputs=task.n_outputs, **config.model, **wanted)


@dataclass
class TrainedRun:
    """A trained model rebuilt from its checkpoint, with its fitted task and what it expects as input."""

    path: Path
    model: MILModel | None  # None when loaded without it (evaluation needs only task and config)
    task: Task
    config: TrainConfig
    in_dim: int
    encoder: str | None
    random_init: bool
    device: torch.device
    epoch: int | None = None

    @property
    def aggregator(self) -> str:
        return self.config.aggregator

    @property
    def encoder_label(self) -> str | None:
        """The encoder as reports name it (a randomly initialised one is another feature space)."""
        return None if self.encoder is None else encoder_name(self.encoder, self.random_init)

    def autocast(self) -> Any:
        """The precision training scored bags with: bf16 on a GPU when the run used amp, else float32."""
        from pathmil.device import autocast

        return autocast(self.device, mil_autocast_dtype(self.device, self.config.amp))


def encoder_name(encoder: str, random_init: bool) -> str:
    """An encoder as messages and reports name it (a randomly initialised one is another feature space)."""
    return f"{encoder} (random init)" if random_init else encoder


def load_run(
    path: str | os.PathLike, device: str = "cpu", expected_task: str | None = None, with_model: bool = True
) -> TrainedRun:
    """Rebuild the model and fitted task of a run: its folder (``best.pt`` inside) or a checkpoint file.

    ``with_model=False`` skips building the model (evaluation reads only the task and the config).

    A run folder must be finished (hold ``metrics.json``): a killed run's ``best.pt`` is not its result.

    Raises:
        PathmilError: a missing, unsafe or foreign checkpoint, an unfinished run, a model of another task
            than ``expected_task``, or weights that do not fit the aggregator the config names.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "metrics.json").is_file():
            raise PathmilError(
                f"run {path} is not finished (no metrics.json); finish it with `pathmil train`"
            )
        path = path / "best.pt"
    checkpoint = load_checkpoint(path)
    task = task_from_state(checkpoint["task"])
    if expected_task is not None and task.name != expected_task:
        raise PathmilError(
            f"model {path} is a {task.name} model, not {expected_task}; give a checkpoint of a {expected_task} run"
        )
    config = TrainConfig.build(checkpoint["config"], f"checkpoint {path}: train")
    target = resolve_device(device)
    model = None
    if with_model:
        model = build_model(config, int(checkpoint["in_dim"]), task)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise PathmilError(
                f"model {path}: weights do not fit aggregator {config.aggregator} ({first})"
            ) from None
        model.to(target).eval()
    features = checkpoint.get("features") or {}
    encoder = features.get("encoder")
    return TrainedRun(
        path=path,
        model=model,
        task=task,
        config=config,
        in_dim=int(checkpoint["in_dim"]),
        encoder=None if encoder is None else str(encoder),
        random_init=bool(features.get("random_init", False)),
        device=target,
        epoch=checkpoint.get("epoch"),
    )
