"""Bags for other tools: ``pathmil export --format clam|trident`` writes pathmil's bags (or any bag
:func:`pathmil.features.bagfile.read_bag` reads) in the layouts CLAM and TRIDENT train on.

- CLAM (``extract_features_fp.py``, ``Generic_MIL_Dataset``): ``OUT/pt_files/<slide>.pt``, the N x D
  features as a float32 tensor alone (CLAM's models are float32; pathmil's float16 features fail there with
  "Half and Float"), and ``OUT/h5_files/<slide>.h5`` with ``features`` (float32) and ``coords`` (level-0
  top-left x, y).
- TRIDENT (``Processor`` and ``WSI.extract_patch_features``): ``OUT/<mag>x_<patch>px_<overlap>px_overlap/
  features_<encoder>/<slide>.h5`` with ``features`` (float32; attributes ``name``, ``savetodir``, ``encoder``)
  and ``coords`` (int64) whose attributes give the patching geometry (``patch_size``, ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification``, ``overlap``, ``level0_width``, ``level0_height``,
  ``name``, ``savetodir``). Magnifications follow the usual 10 / (um/px) rule (0.5 um/px is 20x), and
  pathmil's encoder names become TRIDENT's where TRIDENT has the same model (``uni`` -> ``uni_v1``).

Files are written atomically; every bag is checked when read, so nothing damaged is passed on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from pathmil.errors import PathmilError
from pathmil.features.bagfile import Bag, read_bag, read_bag_attrs
from pathmil.fileio import atomic_hdf5, atomic_output
from pathmil.ids import check_slide_id, slide_id_from_path
from pathmil.slide.tilefile import recorded_mpp_xy

FORMATS = ("clam", "trident")
MppXY = tuple[float, float]  # a slide's (x, y) um/px
TRIDENT_NAMES = {  # pathmil's encoder -> TRIDENT's name of the same model (patch_encoder_models/load.py)
    "uni": "uni_v1",
    "uni2_h": "uni_v2",
    "h_optimus_0": "hoptimus0",
    "h_optimus_1": "hoptimus1",
    "prov_gigapath": "gigapath",
    "conch_v1_5": "conch_v15",
}


def bag_files(paths: list[Path]) -> list[Path]:
    """The bag files named, or those in the folders named (``*.h5`` and ``*.pt``, sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.suffix in (".h5", ".pt") and not p.name.startswith(".")
            )
            if not found:
                raise PathmilError(f"folder {path} holds no bag files (.h5, .pt)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PathmilError(f"feature file {path} does not exist")
    return files


def slide_mpp_xy(bag: Bag, mpp: MppXY | None) -> MppXY | None:
    """The slide's (x, y) um/px for converting ``bag``'s coordinates: ``mpp`` (``--mpp``) if given, else the
    bag's record (``slide_mpp_x``/``slide_mpp_y``, or one ``slide_mpp`` for both), else None."""
    if mpp is not None:
        return float(mpp[0]), float(mpp[1])
    return recorded_mpp_xy({**bag.attrs, **bag.coords_attrs})


def level0_corners(bag: Bag, path: Path, mpp: MppXY | None) -> np.ndarray:
    """The bag's tile positions as level-0 top-left pixels, N x 2 (x, y) int64.

    STAMP's micrometres are divided by the slide's um/px along x and along y (``mpp``, else the bag's
    record); slideflow's centres lose half a tile, ``tile_um`` / mpp-x level-0 px on both axes (slideflow
    reads square level-0 windows of that side; it reads only openslide's mpp-x).

    Raises:
        PathmilError: no coordinates, or micrometres or centres without the slide's um/px or tile size.
    """
    if bag.coords is None:
        raise PathmilError(
            f"feature file {path} has no tile coordinates (a CLAM .pt file?); export its .h5 bag"
        )
    coords = np.asarray(bag.coords, dtype=np.float64).reshape(-1, 2)
    if bag.coords_unit == "um" or bag.coords_origin == "centre":
        mpp_xy = slide_mpp_xy(bag, mpp)
        if mpp_xy is None:
            raise PathmilError(
                f"feature file {path} has coordinates in micrometres or tile centres; give the slide's um/px "
                "(--mpp X, or --mpp X Y where pixels are not square) to convert them to level-0 pixels"
            )
        if bag.coords_unit == "um":
            coords = coords / np.array(mpp_xy)
        if bag.coords_origin == "centre":
            size_um = bag.coords_attrs.get("tile_um")
            if not size_um:
                raise PathmilError(
                    f"feature file {path} has tile centres but no tile size (bags_config.json)"
                )
            coords = coords - float(size_um) / mpp_xy[0] / 2
    if (coords < 0).any():
        x, y = coords[(coords < 0).any(axis=1).argmax()]
        raise PathmilError(
            f"feature file {path}: a tile's level-0 corner would lie outside the slide ({x:.0f}, {y:.0f}); "
            "is the slide's um/px right (--mpp)?"
        )
    return np.rint(coords).astype(np.int64)


def export_bag(path: Path, out: Path, fmt: str, mpp: MppXY | None = None) -> list[Path]:
    """Write one bag in ``fmt``'s layout under ``out``; return the files written.

    Raises:
        PathmilError: a bad bag, an unknown format, or (TRIDENT) a bag without its tile geometry.
    """
    if fmt not in FORMATS:
        raise PathmilError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    bag = read_bag(path)
    attrs = {**read_bag_attrs(path), **bag.attrs}
    slide_id = check_slide_id(str(attrs.get("slide_id") or slide_id_from_path(path)), str(path))
    features = np.asarray(bag.features, dtype=np.float32)
    if fmt == "clam":
        return _write_clam(out, slide_id, features, bag, path, mpp)
    return [_write_trident(out, slide_id, features, bag, attrs, path, mpp)]


def _write_clam(
    out: Path, slide_id: str, features: np.ndarray, bag: Bag, path: Path, mpp: MppXY | None
) -> list[Path]:
    import torch

    written = []
    pt = out / "pt_files" / f"{slide_id}.pt"
    with atomic_output(pt) as tmp:
        torch.save(torch.from_numpy(features), tmp)
    written.append(pt)
    if bag.coords is not None:
        h5 = out / "h5_files" / f"{slide_id}.h5"
        with atomic_hdf5(h5) as f:
            f.create_dataset("features", data=features)
            dset = f.create_dataset("coords", data=level0_corners(bag, path, mpp))
            for key in ("patch_size", "patch_level", "patch_size_level0", "level0_width", "level0_height"):
                if bag.coords_attrs.get(key) is not None:
                    dset.attrs[key] = bag.coords_attrs[key]
        written.append(h5)
    return written


def trident_geometry(bag: Bag, attrs: dict[str, Any], path: Path, mpp: MppXY | None = None) -> dict[str, Any]:
    """TRIDENT's patching attributes from pathmil's (or TRIDENT's own) tile geometry, or from STAMP's and
    slideflow's tile size in um and px with the slide's um/px (``mpp``, else the bag's record).

    Raises:
        PathmilError: the geometry is not known, or (STAMP, slideflow) the slide's um/px is missing or not
            square: TRIDENT's layout has one level-0 tile side.
    """
    c = {**attrs, **bag.coords_attrs}
    if c.get("target_magnification") and c.get("patch_size"):  # a TRIDENT bag: keep its own
        return {k: c[k] for k in TRIDENT_COORDS_ATTRS if c.get(k) is not None}
    if not c.get("patch_size_level0"):
        c.update(_foreign_geometry(c, bag, path, mpp))
    target_mpp, tile_px, size0 = c.get("target_mpp"), c.get("tile_px"), c.get("patch_size_level0")
    if not (target_mpp and tile_px and size0):
        raise PathmilError(
            f"feature file {path} lacks its tile geometry (target_mpp, tile_px, patch_size_level0), which "
            "TRIDENT's layout needs; export a pathmil bag"
        )
    slide_mpp = c.get("slide_mpp")
    magnification = c.get("level0_magnification") or (10.0 / float(slide_mpp) if slide_mpp else None)
    geometry = {
        "patch_size": int(tile_px),
        "patch_size_level0": round(float(size0)),
        "level0_magnification": _magnification(magnification),
        "target_magnification": _magnification(10.0 / float(target_mpp)),
        "overlap": round(float(c.get("overlap") or 0) * int(tile_px)),
        "level0_width": c.get("level0_width"),
        "level0_height": c.get("level0_height"),
    }
    return {k: v for k, v in geometry.items() if v is not None}


def _foreign_geometry(c: dict[str, Any], bag: Bag, path: Path, mpp: MppXY | None) -> dict[str, Any]:
    """pathmil's tile geometry from a STAMP (``tile_size_um``, ``tile_size_px``) or slideflow (``tile_um``,
    ``tile_px``) bag and the slide's um/px; {} where the bag names no tile size."""
    tile_um, tile_px = c.get("tile_um") or c.get("tile_size_um"), c.get("tile_px") or c.get("tile_size_px")
    if not (tile_um and tile_px):
        return {}
    mpp_xy = slide_mpp_xy(bag, mpp)
    if mpp_xy is None:
        raise PathmilError(
            f"feature file {path} gives its tiles in um; give the slide's um/px (--mpp) for TRIDENT's level-0 "
            "tile size"
        )
    if not math.isclose(*mpp_xy, rel_tol=1e-3):
        raise PathmilError(
            f"feature file {path}: the slide's pixels are not square ({mpp_xy[0]:g} x {mpp_xy[1]:g} um/px) and "
            "TRIDENT's layout has one level-0 tile side; export it with --format clam"
        )
    return {
        "target_mpp": float(tile_um) / float(tile_px),
        "tile_px": int(tile_px),
        "patch_size_level0": float(tile_um) / mpp_xy[0],
        "slide_mpp": mpp_xy[0],
    }


TRIDENT_COORDS_ATTRS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
                        "overlap", "level0_width", "level0_height")  # fmt: skip


def _magnification(value: float | None) -> int | float | None:
    if value is None:
        return None
    value = float(value)
    return round(value) if abs(value - round(value)) < 1e-6 else round(value, 3)


def _write_trident(
    out: Path,
    slide_id: str,
    features: np.ndarray,
    bag: Bag,
    attrs: dict[str, Any],
    path: Path,
    mpp: MppXY | None,
) -> Path:
    geometry = trident_geometry(bag, attrs, path, mpp)
    encoder = str(attrs.get("encoder") or "unknown")
    name = TRIDENT_NAMES.get(encoder, encoder)
    folder = (
        out / f"{_magnification(geometry['target_magnification'])}x_{geometry['patch_size']}px_"
        f"{geometry.get('overlap', 0)}px_overlap" / f"features_{name}"
    )
    target = folder / f"{slide_id}.h5"
    with atomic_hdf5(target) as f:
        dset = f.create_dataset("features", data=features)
        dset.attrs.update({"name": slide_id, "savetodir": str(folder), "encoder": name})
        coords = f.create_dataset("coords", data=level0_corners(bag, path, mpp))
        coords.attrs.update({**geometry, "name": slide_id, "savetodir": str(folder.parent)})
    return target


def export_bags(
    paths: list[str | os.PathLike], out: str | os.PathLike, fmt: str, mpp: MppXY | None = None
) -> list[Path]:
    """Export every bag of ``paths`` (files or folders) to ``out`` in ``fmt``; return the files written."""
    written: list[Path] = []
    for path in bag_files([Path(p) for p in paths]):
        written += export_bag(path, Path(out), fmt, mpp)
    return written
