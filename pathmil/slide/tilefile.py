"""The tiles file: one HDF5 per slide with the tile coordinates and how to read them.

``coords`` (N x 2, int64, level-0 top-left x, y) carries the attributes that CLAM's and TRIDENT's readers
use, so their feature extractors run on our tiles too: CLAM reads ``patch_size`` pixels at ``patch_level``;
TRIDENT reads ``patch_size_level0``, ``level0_width``/``height`` and ``level0_magnification``. pathmil adds
``target_mpp``, ``tile_px``, the slide's ``slide_mpp_x``/``slide_mpp_y`` (``slide_mpp``: their mean) and,
for slides with non-square pixels, the read's two sides: ``patch_size_xy`` (w, h at ``patch_level``) and
``patch_size_level0_xy`` (w, h level-0 pixels; the CLAM/TRIDENT attributes give the width).
``tissue_fraction`` (N, float32) says how much of each tile is tissue. Tiles of the last column and row may
cross the slide's edge; what lies beyond reads as white.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathmil import __version__
from pathmil.batch import check_not_failure_record
from pathmil.errors import PathmilError
from pathmil.fileio import atomic_hdf5, plain_attr


@dataclass
class TileSet:
    """The content of a tiles file."""

    coords: np.ndarray
    coords_attrs: dict[str, Any]
    attrs: dict[str, Any]
    tissue_fraction: np.ndarray | None = None

    @property
    def level(self) -> int:
        return int(self.coords_attrs["patch_level"])

    @property
    def read_px(self) -> int:
        return int(self.coords_attrs["patch_size"])

    @property
    def read_size(self) -> tuple[int, int]:
        """(w, h) pixels read at ``level`` per tile; square unless the slide's pixels are not."""
        xy = self.coords_attrs.get("patch_size_xy")
        if xy is None:
            return self.read_px, self.read_px
        return int(xy[0]), int(xy[1])

    @property
    def slide_mpp(self) -> tuple[float, float] | None:
        """The slide's (x, y) um/px the tiles were laid with (for a slide whose metadata lacks it)."""
        return recorded_mpp_xy(self.coords_attrs)

    @property
    def tile_px(self) -> int:
        return int(self.coords_attrs["tile_px"])


def recorded_mpp_xy(attrs: dict[str, Any]) -> tuple[float, float] | None:
    """The slide's (x, y) um/px that a tiles or bag file records: ``slide_mpp_x``/``slide_mpp_y``, else one
    ``slide_mpp`` for both; None where it records neither."""
    if attrs.get("slide_mpp_x") is not None and attrs.get("slide_mpp_y") is not None:
        return float(attrs["slide_mpp_x"]), float(attrs["slide_mpp_y"])
    mpp = attrs.get("slide_mpp")
    return None if mpp is None else (float(mpp), float(mpp))


def write_tiles(path: str | os.PathLike, tiles: TileSet) -> None:
    """Write a tiles file atomically."""
    with atomic_hdf5(path) as f:
        dset = f.create_dataset("coords", data=tiles.coords.astype(np.int64))
        for key, value in tiles.coords_attrs.items():
            if value is not None:
                dset.attrs[key] = value
        if tiles.tissue_fraction is not None:
            f.create_dataset("tissue_fraction", data=tiles.tissue_fraction.astype(np.float32))
        f.attrs["pathmil_version"] = __version__
        for key, value in tiles.attrs.items():
            if value is not None:
                f.attrs[key] = value


def read_tiles(path: str | os.PathLike) -> TileSet:
    """Read a tiles file written by pathmil (or by CLAM/TRIDENT patching: ``coords`` with its attributes)."""
    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"tiles file {path} does not exist; run `pathmil tile` for this slide first")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
            check_not_failure_record(attrs, path)
            coords = f["coords"][:]
            coords_attrs = {k: plain_attr(v) for k, v in f["coords"].attrs.items()}
            fraction = f["tissue_fraction"][:] if "tissue_fraction" in f else None
    except (OSError, KeyError) as err:
        raise PathmilError(
            f"tiles file {path} is not a readable tiles HDF5 ({err}); tile the slide again"
        ) from None
    if "patch_size" not in coords_attrs or "patch_level" not in coords_attrs:
        raise PathmilError(f"tiles file {path}: 'coords' lacks the patch_size/patch_level attributes")
    coords_attrs.setdefault("tile_px", coords_attrs["patch_size"])
    return TileSet(coords=coords, coords_attrs=coords_attrs, attrs=attrs, tissue_fraction=fraction)


def tiling_of(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The tiling settings recorded in a tiles or bag file's root attributes (``tiling``, JSON, written from
    :meth:`pathmil.slide.tile.TileConfig.tiling`), or None where the file does not say (other tools' files)."""
    text = attrs.get("tiling")
    return json.loads(text) if isinstance(text, str) and text else None
