"""The bag file: one HDF5 per slide holding the features of its tiles, and readers of other layouts.

pathmil writes ``features`` (N x D, float16 by default), a copy of the tiles file's ``coords`` with its
attributes, and provenance attributes on the root (``pathmil_version``, ``slide_id``, ``encoder``,
``encoder_weights_sha256``, ``tile_px``, ``target_mpp``, ``slide_mpp``, ...). :func:`read_bag` also reads
the feature files of the tools users already ran, so they can train on what they have:

- CLAM: ``h5_files/<slide>.h5`` with ``features`` and ``coords`` (no attributes), or ``pt_files/<slide>.pt``
  holding the N x D tensor alone;
- TRIDENT: ``features`` and ``coords`` with ``patch_size_level0`` and friends on ``coords``;
- STAMP: ``feats`` and ``coords`` in micrometres (attribute ``unit`` or the ``tile_size_um`` attribute).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathmil import __version__
from pathmil.batch import check_not_failure_record
from pathmil.errors import PathmilError
from pathmil.fileio import atomic_hdf5, load_tensors_safely, plain_attr

LAYOUTS = ("pathmil", "trident", "clam", "clam_pt", "stamp")


@dataclass
class Bag:
    """Features of one slide's tiles, their coordinates, and what is known about how they were made."""

    features: np.ndarray  # N x D
    coords: np.ndarray | None  # N x 2: level-0 pixels, or micrometres when coords_unit is "um"
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    layout: str = "pathmil"
    coords_unit: str = "px"

    @property
    def n_instances(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def write_bag(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray,
    coords_attrs: dict[str, Any],
    attrs: dict[str, Any],
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write a pathmil bag file atomically; ``extra`` holds further per-tile datasets (e.g. names)."""
    if features.ndim != 2 or len(features) != len(coords):
        raise ValueError(f"features {features.shape} do not match coords {coords.shape}")
    with atomic_hdf5(path) as f:
        f.create_dataset(
            "features",
            data=features,
            chunks=(min(len(features), 1024), features.shape[1]) if len(features) else None,
        )
        dset = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for key, value in coords_attrs.items():
            if value is not None:
                dset.attrs[key] = value
        for name, values in (extra or {}).items():
            f.create_dataset(name, data=values)
        f.attrs["pathmil_version"] = __version__
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value


def read_bag_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The root attributes of a bag file, without reading its features (cheap: for resume checks)."""
    with h5py.File(path, "r") as f:
        return {k: plain_attr(v) for k, v in f.attrs.items()}


def feature_provenance(attrs: dict[str, Any]) -> dict[str, Any]:
    """How a bag's features were made, from its root attributes: the encoder (name, weights' sha256, random
    init) and the tiling settings (:func:`pathmil.slide.tilefile.tiling_of`; None where unknown). Training
    keeps it in every checkpoint, and a package checks new features against it."""
    from pathmil.slide.tilefile import tiling_of

    return {
        "encoder": attrs.get("encoder"),
        "encoder_weights_sha256": attrs.get("encoder_weights_sha256"),
        "random_init": bool(attrs.get("random_init", False)),
        "tiling": tiling_of(attrs),
    }


def read_bag(path: str | os.PathLike) -> Bag:
    """Read a bag file of any supported layout (pathmil, TRIDENT, CLAM .h5 or .pt, STAMP)."""
    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"feature file {path} does not exist")
    if path.suffix == ".pt":
        return _read_clam_pt(path)
    try:
        with h5py.File(path, "r") as f:
            return _read_h5(f, path)
    except OSError as err:
        raise PathmilError(f"feature file {path} is not readable HDF5 ({err}); extract it again") from None


def _read_h5(f: h5py.File, path: Path) -> Bag:
    attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
    check_not_failure_record(attrs, path)
    if "features" in f:
        features = _as_matrix(f["features"][:], path)
        coords, coords_attrs = _coords(f)
        if "pathmil_version" in attrs:
            layout = "pathmil"
        elif "patch_size_level0" in coords_attrs or "level0_width" in coords_attrs:
            layout = "trident"
        else:
            layout = "clam"
        return Bag(features, coords, coords_attrs, attrs, layout)
    if "feats" in f:
        features = _as_matrix(f["feats"][:], path)
        coords, coords_attrs = _coords(f)
        unit = str(coords_attrs.get("unit", attrs.get("unit", "um")))
        unit = "um" if unit.lower() in ("um", "micron", "microns", "micrometre", "micrometer") else "px"
        return Bag(features, coords, coords_attrs, attrs, "stamp", coords_unit=unit)
    raise PathmilError(
        f"feature file {path} has neither 'features' (pathmil, CLAM, TRIDENT) nor 'feats' (STAMP)"
    )


def _coords(f: h5py.File) -> tuple[np.ndarray | None, dict[str, Any]]:
    if "coords" not in f:
        return None, {}
    coords = f["coords"][:]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    return coords, {k: plain_attr(v) for k, v in f["coords"].attrs.items()}


def _as_matrix(features: np.ndarray, path: Path) -> np.ndarray:
    """N x D features; some tools save 1 x N x D."""
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise PathmilError(f"feature file {path}: features have shape {features.shape}, expected N x D")
    return features


def _read_clam_pt(path: Path) -> Bag:
    import torch

    tensor = load_tensors_safely(path, what="feature file")
    if not isinstance(tensor, torch.Tensor):
        raise PathmilError(f"feature file {path}: expected a tensor of N x D features (CLAM pt_files)")
    return Bag(_as_matrix(tensor.float().numpy(), path), None, {}, {}, "clam_pt")
