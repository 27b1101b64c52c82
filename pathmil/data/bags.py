"""Bags of tile features for training: one bag per patient (its slides joined) or per slide.

Bag files are found in a features folder in any layout :func:`pathmil.features.bagfile.read_bag` reads
(ours, TRIDENT, STAMP, CLAM's ``h5_files/`` and ``pt_files/``, slideflow), so users with features from
other tools start here. Features are held as float16 (:func:`model_input`), whatever the file stores: bags
stay in memory when they fit the budget, else they are read from disk at each access, and both give the
model the same numbers (so do prediction and heatmaps). In training a bag can be subsampled to ``max_instances`` with a generator seeded by
(seed, epoch, bag), so a resumed run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pathmil.errors import PathmilError
from pathmil.features.bagfile import bag_shape, read_bag


def model_input(features: np.ndarray) -> torch.Tensor:
    """N x D features as every stage hands them to a model: rounded to float16 (the precision pathmil keeps
    bags in), as a float16 tensor; call ``.float()`` (or ``.double()``) on it to score."""
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float16))


def find_bag_file(features_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """The feature file of a slide: ours/TRIDENT/STAMP ``<slide>.h5``, or CLAM's sub-folders."""
    root = Path(features_dir)
    for candidate in (
        root / f"{slide_id}.h5",
        root / "h5_files" / f"{slide_id}.h5",
        root / "pt_files" / f"{slide_id}.pt",
        root / f"{slide_id}.pt",
    ):
        if candidate.is_file():
            return candidate
    return None


@dataclass
class BagTable:
    """The bags of one split: ids, the slides each joins, and their labels (one row per bag)."""

    bags: pd.DataFrame  # bag_id, patient_id, slide_id (";"-joined), label columns
    files: list[list[Path]]  # feature files of each bag's slides


def make_bag_table(
    rows: pd.DataFrame, features_dir: str | os.PathLike, label_columns: list[str], bag_level: str = "patient"
) -> BagTable:
    """Group slide rows (slide_id, patient_id, labels) into bags and find their feature files."""
    missing = [s for s in rows["slide_id"] if find_bag_file(features_dir, s) is None]
    if missing:
        raise PathmilError(
            f"no feature file for {len(missing)} slide(s) in {features_dir} (first: {missing[0]}); extract them "
            "with `pathmil extract`, or drop them from the cohort table"
        )
    key = "patient_id" if bag_level == "patient" else "slide_id"
    records, files = [], []
    for bag_id, group in rows.groupby(key, sort=True):
        group = group.sort_values("slide_id")
        first = group.iloc[0]
        records.append(
            {
                "bag_id": bag_id,
                "patient_id": first["patient_id"],
                "slide_id": ";".join(group["slide_id"]),
                **{c: first[c] for c in label_columns},
            }
        )
        files.append([find_bag_file(features_dir, s) for s in group["slide_id"]])
    return BagTable(bags=pd.DataFrame(records), files=files)


class BagDataset(torch.utils.data.Dataset):
    """Feature matrices (N x D, float32) of a :class:`BagTable`, in memory when they fit."""

    def __init__(
        self, table: BagTable, max_instances: int | None = None, memory_budget_gb: float = 8.0, seed: int = 0
    ):
        self.table = table
        self.max_instances = max_instances
        self.seed = seed
        self.epoch = 0
        shapes = [[bag_shape(p) for p in paths] for paths in table.files]
        self.dim = _common_dim(table.files, shapes)
        self.sizes = [sum(n for n, _ in bag) for bag in shapes]
        in_memory_bytes = sum(self.sizes) * self.dim * 2
        self.cache: list[torch.Tensor] | None = None
        if in_memory_bytes <= memory_budget_gb * 2**30:
            self.cache = [self._load(i) for i in range(len(self))]

    def __len__(self) -> int:
        return len(self.table.files)

    def _load(self, index: int) -> torch.Tensor:
        """Bag ``index`` as float16 (each file checked by :func:`read_bag`)."""
        parts = [model_input(read_bag(p).features) for p in self.table.files[index]]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def set_epoch(self, epoch: int) -> None:
        """Choose the instance sample of this epoch (training only)."""
        self.epoch = epoch

    def features(self, index: int, sample: bool = False) -> torch.Tensor:
        """Bag ``index`` as float32 N x D (values rounded to float16); subsampled to ``max_instances`` when ``sample``."""
        x = self.cache[index] if self.cache is not None else self._load(index)
        if sample and self.max_instances and len(x) > self.max_instances:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            keep = np.sort(rng.choice(len(x), self.max_instances, replace=False))
            x = x[torch.from_numpy(keep)]
        return x.float()

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.features(index)


def _common_dim(files: list[list[Path]], shapes: list[list[tuple[int, int]]]) -> int:
    """The feature dimension all bags share; bags of another dimension are refused, naming two files."""
    first: tuple[Path, int] | None = None
    for paths, bag in zip(files, shapes):
        for path, (_, dim) in zip(paths, bag):
            if first is None:
                first = (path, dim)
            elif dim != first[1]:
                raise PathmilError(
                    f"feature file {path} has {dim}-dimensional features but {first[0]} has {first[1]}; "
                    "use one encoder for all slides"
                )
    return first[1] if first else 0
