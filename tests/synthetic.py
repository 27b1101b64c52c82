"""A synthetic cohort of bag files whose three labels hang on a few key instances per bag.

Training tests need bags that are learnable, cheap and known: each patient has a hidden strength s in
[0, 1]; 1-3 instances per slide lie 4*s along a fixed direction of feature space and the rest are noise.
label = s > 0.5, stil = 100 s, survival time falls with s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pathmil.cli import main
from pathmil.features.bagfile import write_bag

# a small ABMIL trained for two epochs: enough for a checkpoint, a package or predictions, in seconds
TINY_TRAINING = ("--set", "epochs=2", "--set", "min_epochs=1", "--set", "model.hidden=8")


def make_synthetic_cohort(
    root: Path, n_patients: int = 24, extra_slides: int = 6, dim: int = 32, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``root/features/<slide>.h5`` and ``root/cohort.csv``; return (features dir, cohort path)."""
    rng = np.random.default_rng(seed)
    key = rng.normal(size=dim)
    key /= np.linalg.norm(key)
    features_dir = root / "features"
    rows = []
    owners = list(range(n_patients)) + list(rng.choice(n_patients, extra_slides, replace=False))
    strength = rng.uniform(0, 1, n_patients)
    time = 120 * np.exp(-1.5 * strength) * rng.uniform(0.7, 1.3, n_patients)
    event = (rng.uniform(size=n_patients) < 0.75).astype(int)
    for index, owner in enumerate(owners):
        slide_id = f"S{index:03d}"
        n = int(rng.integers(40, 80))
        x = rng.normal(size=(n, dim))
        k = int(rng.integers(3, 7))
        x[:k] += 6 * strength[owner] * key
        coords = np.stack(np.divmod(np.arange(n), 10), 1)[:, ::-1] * 256
        write_bag(
            features_dir / f"{slide_id}.h5",
            x.astype(np.float16),
            coords,
            {"patch_size": 256, "patch_level": 0, "patch_size_level0": 256},
            {"slide_id": slide_id, "encoder": "synthetic"},
        )
        rows.append(
            {
                "slide_id": slide_id,
                "patient_id": f"P{owner:03d}",
                "label": int(strength[owner] > 0.5),
                "time": round(float(time[owner]), 2),
                "event": int(event[owner]),
                "stil": round(100 * float(strength[owner]), 1),
            }
        )
    cohort = root / "cohort.csv"
    pd.DataFrame(rows).to_csv(cohort, index=False)
    return features_dir, cohort


def split_and_train(
    root: Path,
    features: Path,
    table: Path,
    folds: Sequence[int] = (0, 1),
    settings: Sequence[str] = TINY_TRAINING,
) -> tuple[Path, list[Path]]:
    """Split ``table`` into two patient-level classification folds (``root/splits.csv``), then train on
    each fold of ``folds`` with ``settings`` (``root/run<fold>``). Returns the splits file and the runs."""
    splits = root / "splits.csv"
    split = [
        "split",
        "--cohort",
        str(table),
        "--task",
        "classification",
        "--folds",
        "2",
        "--out",
        str(splits),
    ]
    assert main(split) == 0
    runs = []
    for fold in folds:
        run = root / f"run{fold}"
        train = ["train", "--features", str(features), "--cohort", str(table), "--splits", str(splits),
                 "--fold", str(fold), "--task", "classification", "--out", str(run), "--no-progress"]  # fmt: skip
        assert main([*train, *settings]) == 0
        runs.append(run)
    return splits, runs
