"""Patient-level cross-validation splits.

No patient may sit in two folds: slides of one patient share tissue, scanner and label, and splitting them
leaks. Folds are stratified by what the task says matters (class; event and time quantile; value bins) so
small cohorts still get every kind of case in every fold. Each fold's training patients lose a further
``val_frac`` to a validation part for early stopping. With ``test_frac`` a fixed test set is held out of
every fold instead, and the folds rotate the validation part over the rest.

The splits table has one row per slide and fold: ``slide_id, patient_id, fold, split`` with ``split`` in
train, val, test. With slide-level labels (``bag_level: slide``, Camelyon17) the strata are the slides'
labels, but the folds stay patient-level: a patient's slides share a part of every fold. A splits table
from another tool is checked for the same when it is read for training (:func:`check_patient_level`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.model_selection import StratifiedGroupKFold

from pathmil.cohort import BagLevel, bag_level_field, task_options_field
from pathmil.errors import PathmilError
from pathmil.settings import Settings


class SplitConfig(Settings):
    """Patient-level cross-validation: K folds, each with a validation part for early stopping."""

    section = "split"
    folds: int = Field(5, ge=2, description="patient-level folds")
    val_frac: float = Field(
        0.15, ge=0, lt=1, description="share of each fold's training patients kept for early stopping"
    )
    test_frac: float | None = Field(
        None, gt=0, lt=1, description="hold out a fixed test set of this share (folds then rotate validation)"
    )
    seed: int = Field(0, description="seed of the fold assignment")
    bag_level: BagLevel = bag_level_field()
    task_options: dict[str, Any] = task_options_field()


def _usable_strata(strata: np.ndarray, n_splits: int) -> np.ndarray:
    """Strata that can be spread over ``n_splits`` folds: rare strata are merged, and if even the merged
    strata are too small the split is unstratified (all one stratum)."""
    strata = np.asarray(strata).astype(str)
    values, counts = np.unique(strata, return_counts=True)
    rare = set(values[counts < n_splits])
    if rare:
        strata = np.where(np.isin(strata, list(rare)), "__rare__", strata)
        values, counts = np.unique(strata, return_counts=True)
    if counts.max() < n_splits:
        return np.zeros(len(strata), dtype=int)
    return strata


def _group_folds(patients: np.ndarray, strata: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    """Indices of the bags per fold, stratified by ``strata``; ``patients`` names each bag's patient (a bag
    is a patient, or one of its slides), and a patient's bags always share a fold."""
    strata = _usable_strata(strata, n_splits)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # A stratum smaller than n_splits cannot reach every fold; that is expected in small cohorts.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [held for _, held in splitter.split(patients, strata, groups=patients)]


def _holdout(patients: np.ndarray, strata: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Indices of a stratified subset of about ``frac`` of the patients' bags (at least one patient,
    never all): one of round(1 / frac) stratified folds, or for ``frac`` over one half all but one of
    round(1 / (1 - frac))."""
    n_patients = len(np.unique(patients))
    if frac <= 0 or n_patients < 2:
        return np.zeros(0, dtype=int)
    if frac > 0.5:
        rest = _holdout(patients, strata, 1 - frac, seed)
        return np.setdiff1d(np.arange(len(patients)), rest)
    n_splits = min(n_patients, max(2, round(1 / frac)))
    return _group_folds(patients, strata, n_splits, seed)[0]


def too_many_folds(folds: int, who: str, n: int) -> str:
    """The words for more folds than the patients each test part needs one of; the workflow's dry run
    says the same (check_folds in workflow/rules/common.smk)."""
    fix = f"use at most {n} folds" if n >= 2 else "cross-validation needs at least 2 of them"
    return f"split.folds is {folds} but {who}; each fold needs one in its test part: {fix}"


def check_folds(folds: int, patients: np.ndarray, needs: Sequence[tuple[str, np.ndarray]] = ()) -> None:
    """Refuse more folds than patients, or than the patients of a kind every test part needs (``needs``:
    its words and a mask over ``patients``, e.g. a class: :meth:`pathmil.tasks.base.Task.fold_needs`).
    With fewer, a fold tests none of them, and its metric (AUC of that class) is undefined.

    Raises:
        PathmilError: naming the folds and the patients.
    """
    patients = np.asarray(patients)
    n = len(np.unique(patients))
    limits = [(n, f"the cohort has only {n} patient{'s' * (n != 1)}")]
    for name, mask in needs:
        k = len(np.unique(patients[np.asarray(mask, dtype=bool)]))
        limits.append((k, f"only {f'{k} patients have' if k != 1 else '1 patient has'} {name}"))
    k, who = min(limits, key=lambda limit: limit[0])  # the tightest: its advice is the one that works
    if k < folds:
        raise PathmilError(too_many_folds(folds, who, k))


def make_splits(
    bags: pd.DataFrame,
    slides: pd.DataFrame,
    strata: np.ndarray,
    folds: int = 5,
    val_frac: float = 0.15,
    test_frac: float | None = None,
    seed: int = 0,
    needs: Sequence[tuple[str, np.ndarray]] = (),
) -> pd.DataFrame:
    """Patient-level folds, stratified per bag.

    ``bags`` has one row per bag with its ``patient_id`` (one row per patient for patient bags, one per
    slide for slide bags), aligned with ``strata`` and the masks of ``needs`` (:func:`check_folds`);
    ``slides`` maps ``slide_id`` to ``patient_id``. Every patient lies in exactly one part (train, val or
    test) of each fold, whatever the bag level.

    Raises:
        PathmilError: fewer patients than folds (of a kind in ``needs`` too), or a fraction out of range.
    """
    ids = bags["patient_id"].to_numpy()
    strata = np.asarray(strata)
    if folds < 2:
        raise PathmilError(f"need at least 2 folds, got {folds}")
    check_folds(folds, ids, needs)
    if not 0 <= val_frac < 1:
        raise PathmilError(f"val_frac must be in [0, 1), got {val_frac}")
    fixed_test = np.zeros(0, dtype=int)
    if test_frac:
        if not 0 < test_frac < 1:
            raise PathmilError(f"test_frac must be in (0, 1), got {test_frac}")
        fixed_test = _holdout(ids, strata, test_frac, seed)
    rest = np.setdiff1d(np.arange(len(ids)), fixed_test)
    n_rest = len(np.unique(ids[rest]))
    if n_rest < folds:
        raise PathmilError(
            too_many_folds(folds, f"only {n_rest} patients remain after the test_frac hold-out", n_rest)
        )
    rows = []
    for fold, held in enumerate(_group_folds(ids[rest], strata[rest], folds, seed)):
        held = rest[held]
        if len(fixed_test):
            test, val = fixed_test, held
            train = np.setdiff1d(rest, held)
        else:
            test = held
            remaining = np.setdiff1d(rest, held)
            val = remaining[_holdout(ids[remaining], strata[remaining], val_frac, seed + fold)]
            train = np.setdiff1d(remaining, val)
        for split, members in (("train", train), ("val", val), ("test", test)):
            rows.extend({"patient_id": p, "fold": fold, "split": split} for p in np.unique(ids[members]))
    assignment = pd.DataFrame(rows)
    table = slides[["slide_id", "patient_id"]].merge(assignment, on="patient_id", how="inner")
    return table.sort_values(["fold", "split", "patient_id", "slide_id"]).reset_index(drop=True)[
        ["slide_id", "patient_id", "fold", "split"]
    ]


def check_patient_level(rows: pd.DataFrame, where: str) -> None:
    """Every patient, and every slide, lies in one part of each fold: a splits file from another tool that
    puts one patient's slides in train and test would leak.

    ``rows`` holds ``slide_id``, ``patient_id`` (the cohort's), ``fold`` and ``split``.

    Raises:
        PathmilError: naming the fold, the patient or slide, and the parts it lies in.
    """
    for (fold, patient), group in rows.groupby(["fold", "patient_id"], sort=True):
        parts = sorted(set(group["split"]))
        if len(parts) > 1:
            slides = ", ".join(f"{s} ({p})" for s, p in zip(group["slide_id"], group["split"]))
            raise PathmilError(
                f"{where}: patient {patient} lies in {' and '.join(parts)} of fold {fold} (slides {slides}); "
                "folds must be patient-level: make the splits with `pathmil split`"
            )
    twice = rows[rows.duplicated(["fold", "slide_id"])]
    if len(twice):
        raise PathmilError(
            f"{where}: slide {twice['slide_id'].iloc[0]} appears twice in fold {twice['fold'].iloc[0]}; "
            "give each slide one row per fold"
        )


def read_splits(path, fold: int) -> pd.DataFrame:
    """The rows of one fold of a splits table, with clear errors for a wrong file or fold."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"splits table {path} does not exist; make it with `pathmil split`")
    table = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})
    missing = {"slide_id", "patient_id", "fold", "split"} - set(table.columns)
    if missing:
        raise PathmilError(f"splits table {path} lacks column(s) {', '.join(sorted(missing))}")
    folds = sorted(table["fold"].unique())
    if fold not in folds:
        raise PathmilError(f"splits table {path} has no fold {fold}; its folds are {folds}")
    part = table[table["fold"] == fold]
    bad = set(part["split"]) - {"train", "val", "test"}
    if bad:
        raise PathmilError(f"splits table {path}: unknown split name(s) {sorted(bad)}; use train, val, test")
    return part.reset_index(drop=True)
