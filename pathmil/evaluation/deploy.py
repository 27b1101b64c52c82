"""Slides in, predictions out: a package applied to raw slides (``pathmil predict --package --slides``).

Each slide is tiled and encoded exactly as the package's training bags were (its tiling settings, its
encoder and weights), then the package's fold models score every bag as an ensemble. Work already done is
reused where its provenance matches: a tiles file whose recorded tiling equals the package's and that was
made for this very slide (same level-0 size) is kept, and a bag that matches encoder, weights and tiles is
kept (:func:`pathmil.features.extract.extract_slide`); anything else is made again in place. A slide that
cannot be tiled or encoded goes to ``failures.csv`` with its reason and the others finish. With labels in
the slide table (the task's label columns, for every slide), the predictions carry them, ready for
``pathmil evaluate --predictions``: an external test set.

Outputs in ``out_dir``: ``predictions.csv``, ``failures.csv``, ``slides.csv`` (the slides scored),
``tiles/`` and ``qc/``, ``features/<encoder>/`` (unless other folders are given) and, on request,
``heatmaps/<slide>.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from pathmil.batch import run_batch
from pathmil.errors import PathmilError
from pathmil.evaluation.package import Package, score_package
from pathmil.features.extract import ExtractConfig, FeatureExtractor, extract_slide
from pathmil.fileio import atomic_output, plain_attr
from pathmil.slide.tile import TileConfig, tile_slide

log = logging.getLogger(__name__)


def tile_config_of(package: Package, default_mpp: float | None = None) -> TileConfig:
    """The package's tiling as settings (with ``default_mpp`` for slides whose metadata lacks it).

    Raises:
        PathmilError: the package does not know its tiling (its bags were not made by pathmil).
    """
    if not package.tiling:
        raise PathmilError(
            f"package {package.path} does not know how its bags were tiled (they were not made by "
            "`pathmil tile`); score bag files with --features instead"
        )
    return TileConfig.from_tiling(package.tiling, default_mpp=default_mpp)


def extractor_of(package: Package, weights: str | None = None, **settings: Any) -> FeatureExtractor:
    """The package's encoder with its weights (``weights`` or the usual caches), checked by sha256.

    Raises:
        PathmilError: weights not found, or weights whose sha256 is not the package's.
    """
    encoder = package.encoder
    config = ExtractConfig.build(
        {
            "encoder": encoder["name"],
            "weights": None if encoder.get("random_init") else weights,
            "random_init": bool(encoder.get("random_init")),
            **{k: v for k, v in settings.items() if v is not None},
        },
        "extract",
    )
    extractor = FeatureExtractor(config)
    wanted = encoder.get("weights_sha256") or ""
    if wanted and extractor.weights_sha256 != wanted:
        raise PathmilError(
            f"encoder weights {extractor.weights_path} have sha256 {extractor.weights_sha256[:12]}..., package "
            f"{package.path} was trained on {encoder['name']} weights {wanted[:12]}...; give those (--weights)"
        )
    return extractor


def tiles_are_current(path: Path, config: TileConfig, slide_id: str, slide_path: str | os.PathLike) -> bool:
    """True when ``path`` holds tiles of this slide file (its id, level-0 size and OpenSlide fingerprint)
    made with ``config``'s tiling."""
    import h5py

    from pathmil.slide.reader import Slide
    from pathmil.slide.tilefile import tiling_of

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
            coords = {k: plain_attr(v) for k, v in f["coords"].attrs.items()} if "coords" in f else {}
    except OSError:
        return False
    tiling = tiling_of(attrs)
    same = json.dumps(tiling, sort_keys=True) == json.dumps(config.tiling(), sort_keys=True)
    if attrs.get("status") == "failed" or not same or str(attrs.get("slide_id")) != slide_id:
        return False
    try:
        with Slide(slide_path, slide_id) as slide:
            same_size = (coords.get("level0_width"), coords.get("level0_height")) == tuple(slide.dimensions)
            return same_size and not slide.is_other_file_than(attrs.get("slide_quickhash"))
    except PathmilError:
        return False


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the stage a slide's failure belongs to (the failures table's ``stage`` column)."""
    try:
        yield
    except PathmilError as err:
        if not hasattr(err, "stage"):
            err.stage = name
        raise


def predict_slides(
    package: Package,
    slides: pd.DataFrame,
    out_dir: str | os.PathLike,
    weights: str | None = None,
    tiles_dir: str | os.PathLike | None = None,
    features_dir: str | os.PathLike | None = None,
    heatmaps: bool = False,
    default_mpp: float | None = None,
    extract: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tile, extract and score every slide of ``slides`` (``slide_id``, ``path``, optional ``mpp``,
    ``patient_id`` and labels) with ``package``; write the outputs (module docstring) and return a summary.

    Raises:
        PathmilError: a package that cannot tile (unknown tiling), other encoder weights, or no slide that
            could be scored; a failing slide alone is recorded in ``failures.csv`` instead.
    """
    out_dir = Path(out_dir)
    tile_config = tile_config_of(package, default_mpp)
    extractor = extractor_of(package, weights, **(extract or {}))
    tiles_dir = Path(tiles_dir) if tiles_dir else out_dir / "tiles"
    qc_dir = out_dir / "qc"
    encoder_folder = package.encoder["name"].replace(":", "-")
    features_dir = Path(features_dir) if features_dir else out_dir / "features" / encoder_folder

    def work(row: Any) -> dict[str, Any]:
        tiles = tiles_dir / f"{row.slide_id}.h5"
        reused = tiles_are_current(tiles, tile_config, row.slide_id, row.path)
        table_mpp = getattr(row, "mpp", None)
        use_table = table_mpp is not None and not pd.isna(table_mpp)
        with stage("tile"):
            if not reused:
                tile_slide(
                    row.path,
                    tiles,
                    tile_config,
                    qc=qc_dir / f"{row.slide_id}.png",
                    slide_id=row.slide_id,
                    mpp=float(table_mpp) if use_table else default_mpp,
                    mpp_source="table" if use_table else "argument",
                )
        with stage("extract"):
            bag = features_dir / f"{row.slide_id}.h5"
            facts = extract_slide(row.path, tiles, bag, extractor, row.slide_id)
        return {
            "slide_id": row.slide_id,
            "tiles": "reused" if reused else "made",
            "features": "reused" if facts.get("skipped") else "extracted",
            "n_tiles": facts.get("n_tiles"),
        }

    done = run_batch(slides.itertuples(index=False), work, "tile", out_dir / "failures.csv", True, progress)
    if not done:
        raise PathmilError(f"no slide could be tiled and encoded (see {out_dir / 'failures.csv'})")
    ok = slides[slides["slide_id"].isin({d["slide_id"] for d in done})].copy()
    if "patient_id" not in ok.columns:
        ok["patient_id"] = ok["slide_id"]
    ok["patient_id"] = ok["patient_id"].fillna(ok["slide_id"])
    with atomic_output(out_dir / "slides.csv") as tmp:
        ok.to_csv(tmp, index=False)
    predictions = score_package(package, cohort=ok, features_dir=features_dir, progress=progress)
    with atomic_output(out_dir / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    pictures = []
    if heatmaps:
        from pathmil.evaluation.heatmap import make_heatmap

        for row in ok.itertuples(index=False):
            out = out_dir / "heatmaps" / f"{row.slide_id}.png"
            table_mpp = getattr(row, "mpp", None)
            mpp = float(table_mpp) if table_mpp is not None and not pd.isna(table_mpp) else default_mpp
            bag = features_dir / f"{row.slide_id}.h5"
            make_heatmap(package.members, bag, row.path, out, mpp=mpp)
            pictures.append(str(out))
    return {
        "n_slides": len(slides),
        "n_scored": len(ok),
        "n_bags": len(predictions),
        "n_failed": len(slides) - len(ok),
        "labelled": "target" in predictions.columns or "time" in predictions.columns,
        "slides": done,
        "heatmaps": pictures,
        "features_dir": str(features_dir),
    }
