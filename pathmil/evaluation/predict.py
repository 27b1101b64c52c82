"""Score new slides with trained models: one checkpoint, or the fold models of a run as an ensemble.

A checkpoint (``best.pt``) carries the run's config, the fitted task and the weights, so it alone rebuilds
the model (:func:`pathmil.training.run.load_run`). Scores are made exactly as training made its
``predictions.csv``: the same bag joining (a patient's slides concatenated in slide-id order when the model
was trained on patient bags, as :func:`pathmil.data.bags.make_bag_table` does), the same features (the
bag dataset, float16 values), the same scoring pass (:func:`pathmil.training.run.score_bag`: float64 on
the CPU, so the thread count and the CPU's instruction set do not change a digit that matters) and
``task.predict``; so a fold's own test bags get back the numbers training wrote, to 1e-6.

Several checkpoints (the K fold models) make an ensemble: the mean of their scores, as a fixed test set
is pooled by ``pathmil evaluate``. Derived columns follow from the mean probabilities with training's
rules (the predicted class is the most probable one).

Inputs are refused with one line when they cannot fit: bags whose feature dimension differs from the
model's, bags from another encoder (when both name theirs), or a model of another task than expected.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pathmil.cohort import read_table
from pathmil.data.bags import BagDataset, BagTable, make_bag_table
from pathmil.errors import PathmilError
from pathmil.features.bagfile import feature_provenance, read_bag_attrs
from pathmil.fileio import atomic_output
from pathmil.ids import slide_id_from_path
from pathmil.tasks.classification import ClassificationTask
from pathmil.training.run import TrainedRun, encoder_name, load_run

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the model


# The tiling settings that decide which tiles (and so which features) a slide gets.
TILING_KEYS = ("target_mpp", "tile_px", "overlap", "min_tissue", "preset", "tissue")


def tiling_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The tiling settings that differ, as ``key a vs b``; um/px within 2 % (another tool's tile_um /
    tile_px, e.g. slideflow's 302 um in 299 px, is pathmil's 1.0 um/px)."""
    return [
        f"{key} {theirs.get(key)!r} vs {ours.get(key)!r}"
        for key in TILING_KEYS
        if key in theirs and key in ours and not _same_setting(key, theirs[key], ours[key])
    ]


def _same_setting(key: str, a: Any, b: Any) -> bool:
    if key == "target_mpp" and a is not None and b is not None:
        return math.isclose(float(a), float(b), rel_tol=0.02)
    return a == b


def check_provenance(
    trained: dict[str, Any], attrs: dict[str, Any], source: str | os.PathLike, model: str, fix: str
) -> None:
    """Refuse a bag (its root attributes) made otherwise than a model's training bags (``trained``, as
    :func:`pathmil.features.bagfile.feature_provenance` gives it): another encoder, other encoder weights,
    another tiling. What the training bags record and the bag does not (a CLAM ``.pt``, a file another
    tool wrote) cannot be checked: a warning says so, once per model and missing fact.

    Raises:
        PathmilError: one line naming the bag, the model (``model``), what differs and ``fix``.
    """
    found = feature_provenance(attrs)
    encoder = trained.get("encoder")
    random_init = bool(trained.get("random_init", False))
    if found["encoder"] and encoder and (str(found["encoder"]), found["random_init"]) != (encoder, random_init):
        raise PathmilError(
            f"{source} holds features of encoder {encoder_name(str(found['encoder']), found['random_init'])} "
            f"but {model} was trained on {encoder_name(encoder, random_init)}; {fix}"
        )
    weights, ours = found["encoder_weights_sha256"], trained.get("encoder_weights_sha256")
    if weights and ours and weights != ours:
        raise PathmilError(
            f"{source} holds {encoder} features made with other weights (sha256 {str(weights)[:12]}...) than "
            f"{model} ({ours[:12]}...); {fix}"
        )
    tiling = found["tiling"] or {k: attrs[k] for k in ("target_mpp", "tile_px") if k in attrs}  # other tools
    differ = tiling_differences(trained["tiling"], tiling) if trained.get("tiling") and tiling else []
    if differ:
        raise PathmilError(
            f"{source} was tiled otherwise than {model}'s training bags ({'; '.join(differ)}, bag vs "
            f"training); {fix}"
        )
    lacking = [k for k in TILING_KEYS if k in (trained.get("tiling") or {}) and k not in (tiling or {})]
    unrecorded = [
        what
        for what, ours, theirs in (
            ("encoder", encoder, found["encoder"]),
            ("encoder weights", trained.get("encoder_weights_sha256"), weights),
            (f"tiling ({', '.join(lacking)})", lacking, None),  # a slideflow bag knows its size, not its tissue
        )
        if ours and not theirs and (model, what) not in _UNCHECKED
    ]
    if unrecorded:
        _UNCHECKED.update((model, what) for what in unrecorded)
        log.warning(
            "%s records no %s (written by another tool?): cannot check that it matches %s's training bags; "
            "scored as if it did",
            source, " and no ".join(unrecorded), model,
        )  # fmt: skip


_UNCHECKED: set[tuple[str, str]] = set()  # (model, fact) warned about in this process: once, not per bag


def check_bag(run: TrainedRun, source: str | os.PathLike, dim: int, attrs: dict | None = None) -> None:
    """Refuse features the model was not trained on: another dimension, or (where the bag and the
    checkpoint record them) another encoder, other encoder weights or another tiling.

    Raises:
        PathmilError: one line naming the bag, the model and what differs.
    """
    if dim != run.in_dim:
        raise PathmilError(
            f"{source} holds {dim}-dimensional features but model {run.path} expects {run.in_dim} "
            f"(encoder {run.encoder or 'unknown'}); extract the slides with the model's encoder"
        )
    trained = {**(run.features or {}), "encoder": run.encoder, "random_init": run.random_init}
    fix = "extract and tile the slides as its training bags were (a package's `predict --slides` does)"
    check_provenance(trained, attrs or {}, source, f"model {run.path}", fix)


# ------------------------------------------------------------------------------------------- the bags


def bags_from_files(paths: list[str | os.PathLike]) -> BagTable:
    """One bag per feature file, named by the file's ``slide_id`` attribute or else by its file name."""
    records, files = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise PathmilError(f"feature file {path} does not exist")
        attrs = read_bag_attrs(path)
        slide_id = str(attrs.get("slide_id") or slide_id_from_path(path))
        records.append({"bag_id": slide_id, "patient_id": None, "slide_id": slide_id})
        files.append([path])
    bags = pd.DataFrame(records, columns=["bag_id", "patient_id", "slide_id"])
    duplicated = bags["slide_id"][bags["slide_id"].duplicated()]
    if len(duplicated):
        raise PathmilError(f"two feature files are slide {duplicated.iloc[0]}; give each slide once")
    return BagTable(bags=bags, files=files)


def bags_from_cohort(
    cohort: str | os.PathLike | pd.DataFrame,
    features_dir: str | os.PathLike,
    bag_level: str,
    label_columns: list[str],
) -> tuple[BagTable, list[str]]:
    """The bags of a cohort table (a file, or a table already read), joined per patient or not as the
    model was trained.

    Returns the table and the label columns it carries: those of the task when every slide has them (an
    external test cohort with labels), none otherwise (new slides to score).
    """
    required = ("slide_id", "patient_id") if bag_level == "patient" else ("slide_id",)
    if isinstance(cohort, pd.DataFrame):
        missing = [c for c in required if c not in cohort.columns]
        if missing:
            raise PathmilError(f"the cohort table lacks column(s) {', '.join(missing)}")
        table = cohort.copy()
    else:
        table = read_table(cohort, required=required)
    if "patient_id" not in table.columns:
        table["patient_id"] = table["slide_id"]
    absent = table["patient_id"].isna()
    if absent.any():
        raise PathmilError(
            f"cohort table {cohort}: slide {table['slide_id'][absent].iloc[0]} has no patient_id"
        )
    labelled = all(c in table.columns and table[c].notna().all() for c in label_columns)
    columns = list(label_columns) if labelled else []
    return make_bag_table(
        table[["slide_id", "patient_id", *columns]], features_dir, columns, bag_level
    ), columns


# ------------------------------------------------------------------------------------------ scoring


def score_bags(
    loaded: TrainedRun,
    table: BagTable,
    label_columns: list[str] = (),
    progress: bool = False,
    check: Callable[[Path, dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """``slide_id`` (``;``-joined for patient bags), ``patient_id``, targets if labelled, and the task's
    prediction columns of every bag. ``check(path, attrs)`` may refuse a bag file before any is scored."""
    from tqdm import tqdm

    dataset = BagDataset(table, memory_budget_gb=0.0)  # read each bag when it is scored
    for paths in table.files:
        for path in paths:
            attrs = read_bag_attrs(path)
            if check is not None:
                check(path, attrs)
            check_bag(loaded, path, dataset.dim, attrs)
    logits = [
        loaded.score(dataset.features(i)).logits.cpu()
        for i in tqdm(range(len(dataset)), desc=loaded.path.parent.name, unit="bag", disable=not progress)
    ]
    bags = table.bags
    for bag_id, values in zip(bags["bag_id"], logits):
        if not torch.isfinite(values).all():
            raise PathmilError(
                f"model {loaded.path} gives a non-finite score for bag {bag_id}; nothing written"
            )
    out = pd.DataFrame({"slide_id": bags["slide_id"].to_numpy()})
    if bags["patient_id"].notna().all():
        out["patient_id"] = bags["patient_id"].to_numpy()
    if label_columns:
        for name, values in loaded.task.target_columns(bags).items():
            out[name] = values
    logits = torch.cat(logits) if logits else torch.zeros(0, loaded.task.n_outputs)
    for name, values in loaded.task.predict(logits).items():
        out[name] = values
    return out


def check_ensemble(models: list[TrainedRun]) -> None:
    """Models whose scores can be averaged: one task with one setting (and one class list)."""
    first = models[0]
    for other in models[1:]:
        if (other.task.name, other.task.settings()) != (first.task.name, first.task.settings()):
            raise PathmilError(
                f"models {first.path} and {other.path} differ in task or task settings "
                f"({first.task.name} {first.task.settings()} vs {other.task.name} {other.task.settings()}); "
                "average the fold models of one run"
            )
        if isinstance(first.task, ClassificationTask) and other.task.classes != first.task.classes:
            raise PathmilError(
                f"models {first.path} and {other.path} were trained on different classes "
                f"({first.task.classes} vs {other.task.classes}); average models of one cohort"
            )


def ensemble_mean(tables: list[pd.DataFrame], models: list[TrainedRun]) -> pd.DataFrame:
    """The mean of the models' score columns; the predicted class follows from the mean probabilities.

    Survival curves (``surv_<j>``) are averaged only when every model has the same time bins; fold models
    fit their own bins, so their curves are dropped and the mean risk (``score``) stays.
    """
    out = tables[0].copy()
    columns = [c for c in out.columns if c == "score" or c.startswith("score_")]
    surv = [c for c in out.columns if c.startswith("surv_")]
    if surv:
        states = [m.task.state_dict()["fitted"] for m in models]
        if all(s == states[0] for s in states):
            columns += surv
        else:
            log.info("the models' survival bins differ: the ensemble keeps the mean risk, not the curves")
            out = out.drop(columns=surv)
    out[columns] = np.mean([t[columns].to_numpy(dtype=float) for t in tables], axis=0)
    task = models[0].task
    if isinstance(task, ClassificationTask):
        predicted = task.probabilities(out).argmax(axis=1)
        if len(task.classes) > 2:
            out["score"] = predicted.astype(np.float64)
        out["prediction"] = np.asarray(task.classes, dtype=object)[predicted]
    return out


def predict(
    checkpoints: list[str | os.PathLike],
    features: list[str | os.PathLike] | None = None,
    cohort: str | os.PathLike | None = None,
    features_dir: str | os.PathLike | None = None,
    expected_task: str | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> pd.DataFrame:
    """Scores of bag files (one bag each) or of a cohort table's bags, by one model or an ensemble."""
    if not checkpoints:
        raise PathmilError("no model given; pass one checkpoint (best.pt) or several for an ensemble")
    if (features is None) == (cohort is None) or (cohort is not None and features_dir is None):
        raise PathmilError("give bag files (--features), or a cohort table with its features folder")
    models = [load_run(p, device, expected_task) for p in checkpoints]
    return score_with(models, features, cohort, features_dir, progress)


def score_with(
    models: list[TrainedRun],
    features: list[str | os.PathLike] | None = None,
    cohort: str | os.PathLike | pd.DataFrame | None = None,
    features_dir: str | os.PathLike | None = None,
    progress: bool = False,
    check: Callable[[Path, dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Scores of bag files or of a cohort table's bags by loaded models (one, or an ensemble); ``check``
    as :func:`score_bags`'s."""
    if (features is None) == (cohort is None) or (cohort is not None and features_dir is None):
        raise PathmilError("give bag files (--features), or a cohort table with its features folder")
    check_ensemble(models)
    labels: list[str] = []
    if cohort is not None:
        levels = {m.config.bag_level for m in models}
        if len(levels) > 1:
            raise PathmilError(
                "the models were trained on patient and on slide bags; average models trained alike"
            )
        table, labels = bags_from_cohort(cohort, features_dir, levels.pop(), models[0].task.label_columns)
    else:
        table = bags_from_files(features)
    tables = [score_bags(m, table, labels, progress, check) for m in models]
    return tables[0] if len(tables) == 1 else ensemble_mean(tables, models)


def write_predictions(path: str | os.PathLike, predictions: pd.DataFrame) -> None:
    with atomic_output(path) as tmp:
        predictions.to_csv(tmp, index=False)
