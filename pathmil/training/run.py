"""A training run: its settings (:class:`TrainConfig`), how its model is built, and how a trained run is
loaded again (:func:`load_run`) for prediction, heatmaps, evaluation and MHIM-MIL's teacher.

As nanoGPT keeps its config beside the model, a checkpoint keeps the run's whole config beside the
weights, so a ``best.pt`` alone rebuilds the model and its fitted task. This module is the one place that
knows how; the training loop (:mod:`pathmil.training.fit`) and the evaluation stages both use it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from pathmil.cohort import BagLevel, bag_level_field, task_options_field
from pathmil.device import autocast, mil_autocast_dtype, resolve_device, scoring_dtype
from pathmil.errors import PathmilError
from pathmil.models import MILModel, create_model
from pathmil.models.base import MILOutput
from pathmil.models.checkpoint import describe_version, load_checkpoint, same_version
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
    task_options: dict[str, Any] = task_options_field()
    aggregator: str = Field("abmil", description="aggregator name (`pathmil models`)")
    model: dict[str, Any] = Field(default_factory=dict, description="the aggregator's settings")
    mhim: dict[str, Any] = Field(default_factory=dict, description="MHIM-MIL settings (mhim_* aggregators)")
    bag_level: BagLevel = bag_level_field()
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
    init_from: str | None = Field(
        None,
        description="start from a trained model (fine-tuning): a package (its first fold model), a run "
        "folder or a best.pt; the layers whose names and shapes match are loaded, the rest start afresh",
    )
    sources: list[str] = Field(
        default_factory=list,
        description="source models of knowledge transfer for moe_pkt: packages (every fold model is a "
        "source), run folders or checkpoints",
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
        if "sources" in entry.inputs and not self.sources:
            raise ValueError(
                f"aggregator {self.aggregator} needs source models: set train.sources to packages or checkpoints"
            )
        if self.sources and "sources" not in entry.inputs:
            log.warning("train.sources are ignored: aggregator '%s' does not read them", self.aggregator)
        TASKS[self.task].Options.build(self.task_options, "task_options")
        return self


def check_trainable(config: TrainConfig) -> None:
    """Refuse, before a run starts, settings that would train nothing without an error: the Cox loss with
    one bag per optimiser step (its partial likelihood ranks the bags of one step against each other, so
    one bag gives a loss of 0 and a zero gradient). Checkpoints of such runs still load.

    Raises:
        PathmilError: one line naming the settings and the fix.
    """
    if config.task_options.get("loss") == "cox" and config.accumulation < 2:
        raise PathmilError(
            "task_options.loss cox compares the bags of one optimiser step, and train.accumulation "
            f"{config.accumulation} gives each step one bag: its loss is 0 and nothing trains; give each step "
            "16 or more bags (`--set accumulation=32`, or `accumulation: 32` in the train section)"
        )


def build_model(config: TrainConfig, in_dim: int, task: Task, **saved_inputs: Any) -> MILModel:
    """The aggregator named in ``config``, sized for the features and the task, with the inputs its
    registry entry declares (e.g. MHIM-MIL's ``mhim`` settings, the task's instance saliency, the loader
    of its baseline run, :func:`load_run`, so a teacher loads as predict and heatmaps load a model, and
    MoE-PKT's ``sources``). ``saved_inputs`` (a checkpoint's, :meth:`MILModel.checkpoint_inputs`) replace
    the config's."""
    inputs = {
        "mhim": config.mhim,
        "saliency": task.instance_saliency,
        "load_baseline": functools.partial(load_run, expected_task=task.name),
        "sources": config.sources,
    }
    inputs.update(saved_inputs)
    entry = model_entry(config.aggregator)
    wanted = {key: inputs[key] for key in entry.inputs}
    return create_model(config.aggregator, in_dim=in_dim, n_outputs=task.n_outputs, **config.model, **wanted)


def scoring_model(model: MILModel, device: torch.device) -> MILModel:
    """The model that computes written scores: on the CPU a float64 copy (:func:`pathmil.device.scoring_dtype`
    says why), on a GPU the model itself; in eval mode."""
    dtype = scoring_dtype(device)
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    return model.eval()


@torch.inference_mode()
def score_bag(
    model: MILModel, features: torch.Tensor, device: torch.device, trained_in_bf16: bool
) -> MILOutput:
    """One bag (N x D) scored as training's ``predictions.csv``, ``pathmil predict`` and heatmaps all score
    it: features as the bag dataset gives them (float16 values), the model of :func:`scoring_model`, and
    bf16 autocast on a GPU only when the run was trained under it (``amp`` on a GPU). A model trained on
    the CPU is scored in float32 on a GPU: in bf16 its scores moved by up to 2.3 % of their range (H200,
    2026-11-30, benchmarks/RESULTS.md). Logits come back in at least float32."""
    dtype = next(model.parameters()).dtype
    with autocast(device, mil_autocast_dtype(device, trained_in_bf16)):
        out = model(features.to(device, dtype)[None])
    return dataclasses.replace(
        out, logits=out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))
    )


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
    features: dict[str, Any] | None = None  # how the training bags were made (encoder, weights, tiling)
    trained_in_bf16: bool = False  # trained under bf16 autocast (amp on a GPU); scored the same way

    @property
    def aggregator(self) -> str:
        return self.config.aggregator

    @property
    def encoder_label(self) -> str | None:
        """The encoder as reports name it (a randomly initialised one is another feature space)."""
        return None if self.encoder is None else encoder_name(self.encoder, self.random_init)

    @functools.cached_property
    def _scoring_model(self) -> MILModel:
        if self.model is None:
            raise RuntimeError(f"run {self.path} was loaded without its model")
        return scoring_model(self.model, self.device)

    def score(self, features: torch.Tensor) -> MILOutput:
        """One bag's output, exactly as training scored it for ``predictions.csv`` (:func:`score_bag`)."""
        return score_bag(self._scoring_model, features, self.device, self.trained_in_bf16)


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
    config, task_state = settings_of(checkpoint, path)
    task = task_from_state(task_state)
    if expected_task is not None and task.name != expected_task:
        raise PathmilError(
            f"model {path} is a {task.name} model, not {expected_task}; give a checkpoint of a {expected_task} run"
        )
    target = resolve_device(device)
    model = None
    if with_model:
        model = build_model(config, int(checkpoint["in_dim"]), task, **(checkpoint.get("inputs") or {}))
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise PathmilError(
                f"model {path}: weights do not fit aggregator {config.aggregator} ({first})"
                + _other_version(checkpoint)
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
        features=dict(features),
        # older checkpoints do not record it; they were scored with `amp` on any GPU, and still are
        trained_in_bf16=bool(checkpoint.get("trained_in_bf16", config.amp)),
    )


# ------------------------------------------------------------------------------ another pathmil's checkpoint


def _other_version(checkpoint: dict[str, Any]) -> str:
    """The tail of an error about a checkpoint another version wrote; nothing when this version wrote it."""
    if same_version(checkpoint):
        return ""
    return (
        f"; it was written by {describe_version(checkpoint)} and this is {describe_version()}: "
        "train it again with this version, or use it with the one that wrote it"
    )


def _settings_warning(
    checkpoint: dict[str, Any], path: Path, ignored: list[str], defaulted: list[str]
) -> str:
    """One line on the settings a checkpoint holds that this pathmil does not know, and those it lacks.
    A checkpoint of this very version (a development build before a setting was added or removed) says
    so, rather than naming the same version twice as if they differed."""
    if same_version(checkpoint):
        head = f"checkpoint {path} was written by this pathmil ({describe_version()}) with other settings"
        unknown, lacking = (
            "settings this build does not know, ignored",
            "settings it lacks, at their defaults",
        )
    else:
        head = (
            f"checkpoint {path} was written by {describe_version(checkpoint)}; this is {describe_version()}"
        )
        unknown = "settings this version does not know, ignored"
        lacking = "settings it lacks, at this version's defaults"
    parts = [f"{unknown}: {', '.join(ignored)}"] if ignored else []
    parts += [f"{lacking}: {', '.join(defaulted)}"] if defaulted else []
    return f"{head}: {'; '.join(parts)}"


def task_of(checkpoint: dict[str, Any], path: str | os.PathLike) -> Task:
    """The fitted task of a checkpoint, read as :func:`load_run` reads it (older versions' settings too)."""
    return task_from_state(settings_of(checkpoint, Path(path))[1])


def settings_of(checkpoint: dict[str, Any], path: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's :class:`TrainConfig` and task state as this pathmil reads them.

    A checkpoint of another pathmil version may hold settings this version does not know (they are
    ignored) or lack settings this version has (they take their defaults): it loads with one warning that
    names the file, both versions and those settings. A value this version cannot use, or an aggregator or
    task it does not have, is one error line that names both versions (not a typo's "unknown setting").

    Raises:
        PathmilError: the settings cannot be read by this version.
    """
    config = dict(checkpoint["config"])
    state = dict(checkpoint["task"])
    ignored, defaulted = [], []
    fields = TrainConfig.model_fields
    ignored += [f"train.{k}" for k in config if k not in fields]
    defaulted += [f"train.{k}" for k in fields if k not in config]
    config = {k: v for k, v in config.items() if k in fields}
    try:
        entry = model_entry(config.get("aggregator", fields["aggregator"].default))
        task_cls = TASKS[state["name"]]
    except (PathmilError, KeyError) as err:
        raise PathmilError(f"checkpoint {path}: {err}" + _other_version(checkpoint)) from None
    sections: dict[str, Any] = {"model": entry.settings, "task_options": task_cls.Options}
    if "mhim" in entry.inputs:
        from pathmil.models.mhim import MHIMConfig

        sections["mhim"] = MHIMConfig
    for name, cls in sections.items():  # the sections hold what the user set; unset keys take defaults
        given = dict(config.get(name) or {})
        ignored += [f"{name}.{k}" for k in given if k not in cls.model_fields]
        config[name] = {k: v for k, v in given.items() if k in cls.model_fields}
    options = dict(state.get("settings") or {})  # the task's full options, as the task saved them
    ignored += [f"task.{k}" for k in options if k not in task_cls.Options.model_fields]
    defaulted += [f"task.{k}" for k in task_cls.Options.model_fields if k not in options]
    options = {k: v for k, v in options.items() if k in task_cls.Options.model_fields}
    try:
        train_config = TrainConfig.build(config, "train")
        state["settings"] = task_cls.Options.build(options, "task").to_dict()
    except PathmilError as err:
        raise PathmilError(f"checkpoint {path}: {err}{_other_version(checkpoint)}") from None
    if ignored or defaulted:
        log.warning("%s", _settings_warning(checkpoint, path, ignored, defaulted))
    return train_config, state
