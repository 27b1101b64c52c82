"""Knowledge transfer into a training run: start from a source model (``train.init_from``, fine-tuning) and
check that source models (``init_from``, ``moe_pkt``'s ``train.sources``) fit the run's features.

Fine-tuning (Path-PKT's first strategy; Liu et al. 2025) starts the target model from the weights of a
model trained on another cohort: every tensor whose name and shape match is loaded, the rest keep their
fresh initialisation, and one log line says what was loaded and what was not (a survival head over another
number of time bins, a classifier over other classes, another aggregator's layers). The head (the tensors
that map to the outputs) loads only where the outputs mean the same (:meth:`Task.output_meaning`: the same
task, classes, survival loss and bins): a 2-class head of another cohort's classes, or a Cox head in a
regression run, has the right shape and the wrong meaning. Then the run trains as usual, every layer
learning.

A source must have been trained on features of the same kind: the same encoder (and weights) where both
sides name theirs, and the same feature dimension always; anything else is refused in one line. Another
tiling (resolution, tile size) is allowed but warned about: the features then describe other tissue areas.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from pathmil.errors import PathmilError
from pathmil.models import MILModel
from pathmil.models.checkpoint import is_package, model_checkpoints
from pathmil.tasks import Task
from pathmil.training.run import task_of

log = logging.getLogger(__name__)


def encoder_label(features: dict[str, Any]) -> str:
    encoder = str(features.get("encoder"))
    return f"{encoder} (random init)" if features.get("random_init") else encoder


def check_source_features(
    name: str | os.PathLike, checkpoint: dict[str, Any], target: dict[str, Any]
) -> None:
    """Refuse a source model trained on other features than the run's (``target``: the run's
    ``feature_info``): another dimension, encoder or encoder weights. Another tiling is a warning.

    Raises:
        PathmilError: one line naming the source, what it was trained on and what the bags are.
    """
    source = checkpoint.get("features") or {}
    in_dim = int(checkpoint["in_dim"])
    if in_dim != int(target["dim"]):
        raise PathmilError(
            f"source model {name} was trained on {in_dim}-d features ({encoder_label(source)}), these bags "
            f"are {target['dim']}-d ({encoder_label(target)}); transfer needs features of the same encoder"
        )
    if source.get("encoder") and target.get("encoder"):
        if encoder_label(source) != encoder_label(target):
            raise PathmilError(
                f"source model {name} was trained on features of encoder {encoder_label(source)}, these bags "
                f"hold {encoder_label(target)}; extract the target cohort with the source's encoder"
            )
        weights = (source.get("encoder_weights_sha256"), target.get("encoder_weights_sha256"))
        if all(weights) and weights[0] != weights[1]:
            raise PathmilError(
                f"source model {name} was trained on {encoder_label(source)} features made with other "
                f"weights (sha256 {weights[0][:12]}..., these bags {weights[1][:12]}...); extract with the "
                "source's weights"
            )
    tilings = (source.get("tiling"), target.get("tiling"))
    if all(tilings) and tilings[0] != tilings[1]:
        differ = sorted(
            k for k in set(tilings[0]) | set(tilings[1]) if tilings[0].get(k) != tilings[1].get(k)
        )
        log.warning(
            "source model %s was trained on another tiling (%s differ); its features describe other areas",
            name,
            ", ".join(differ),
        )


def check_sources(config: Any, feature_info: dict[str, Any]) -> None:
    """Check every source a run names (``init_from`` and ``sources``) against its features."""
    paths = ([config.init_from] if config.init_from else []) + list(config.sources)
    for path in paths:
        for file, checkpoint in model_checkpoints(path):
            check_source_features(file, checkpoint, feature_info)


def describe_outputs(meaning: tuple[Any, ...]) -> str:
    """``classification (classes 0, 1)``, ``survival (nll loss; 4 outputs)`` from a
    :meth:`Task.output_meaning`."""
    parts = [f"classes {', '.join(map(str, p))}" if isinstance(p, tuple) else str(p) for p in meaning[1:]]
    return f"{meaning[0]} ({'; '.join(parts)})" if parts else str(meaning[0])


def init_from(
    model: MILModel,
    path: str | os.PathLike,
    feature_info: dict[str, Any],
    task: Task,
    aggregator: str | None = None,
) -> dict[str, list[str]]:
    """Load into ``model`` (aggregator ``aggregator``, outputs of the fitted ``task``) every tensor of the
    source model at ``path`` whose name and shape match; the head's tensors (``model.output_tensors()``)
    only where the source's outputs mean what this task's do.

    ``path``: a package (its first fold model; name a member's file for another), a finished run folder or
    a checkpoint. Returns the names loaded, those whose shapes differ, those the source lacks and the head's
    tensors left because their outputs mean something else (``other_outputs``).

    Raises:
        PathmilError: the source does not fit the features (:func:`check_source_features`), or none of its
            tensors fits the model.
    """
    file, checkpoint = model_checkpoints(path)[0]
    check_source_features(file, checkpoint, feature_info)
    if is_package(path):
        log.info("train.init_from %s: starting from its first fold model, %s", path, Path(file).name)
    source: dict[str, torch.Tensor] = checkpoint["model"]
    target = model.state_dict()
    source_task = task_of(checkpoint, file)
    meanings = (source_task.output_meaning(), task.output_meaning())
    head_names = set(model.output_tensors())
    head = head_names if meanings[0] != meanings[1] else set()
    other_outputs = [n for n, t in target.items() if n in head and n in source and source[n].shape == t.shape]
    loaded = [n for n, t in target.items() if n in source and source[n].shape == t.shape and n not in head]
    differ = [n for n, t in target.items() if n in source and source[n].shape != t.shape]
    absent = [n for n in target if n not in source]
    if not loaded:
        raise PathmilError(
            f"train.init_from {file}: none of its tensors fits this {type(model).__name__} (the source is a "
            f"{checkpoint['aggregator']} model); start from a model of the same aggregator"
        )
    model.load_state_dict({n: source[n] for n in loaded}, strict=False)
    message = f"train.init_from {file}: loaded {len(loaded)} of {len(target)} tensors"
    if aggregator is not None and checkpoint["aggregator"] != aggregator:
        message += f" (the source is a {checkpoint['aggregator']} model, this a {aggregator} model)"
    if differ:
        shapes = ", ".join(
            f"{n} ({'x'.join(map(str, source[n].shape))} in the source, {'x'.join(map(str, target[n].shape))} "
            "here)"
            for n in differ
        )
        hint = ""
        if int(checkpoint.get("n_outputs", -1)) != model.n_outputs:
            hint = (
                f"; the source has {checkpoint.get('n_outputs')} outputs, this task {model.n_outputs} "
                "(another number of classes or survival bins)"
            )
        message += f"; shapes differ, left as initialised: {shapes}{hint}"
    if other_outputs:
        message += (
            f"; the head's {', '.join(other_outputs)} left as initialised: the source's outputs are "
            f"{describe_outputs(meanings[0])}, this run's {describe_outputs(meanings[1])}"
        )
    other_label = source_task.label_columns != task.label_columns and any(n in loaded for n in head_names)
    if other_label:  # the same classes (or bins) of another column: the same label renamed, or another one
        message += (
            f"; the head loaded ({describe_outputs(meanings[1])}), but the source predicted column "
            f"{', '.join(source_task.label_columns)} and this run predicts {', '.join(task.label_columns)}: "
            "if these are different labels, its head starts from the other label's knowledge"
        )
    if absent:
        message += f"; not in the source, left as initialised: {', '.join(absent)}"
    (log.warning if differ or absent or other_outputs or other_label else log.info)("%s", message)
    return {"loaded": loaded, "differ": differ, "absent": absent, "other_outputs": other_outputs}
