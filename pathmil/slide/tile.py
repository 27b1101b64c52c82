"""Stage 1: from a slide file to its tiles file, QC picture and facts.

:func:`tile_slide` does one slide and writes nothing unless everything succeeded; :func:`tile_cohort` runs
many slides, records each failure (slide, path, error) in a failures table and goes on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from pathmil import __version__
from pathmil.batch import run_batch
from pathmil.errors import SlideError
from pathmil.fileio import atomic_output, write_json, write_png
from pathmil.settings import Settings, partial
from pathmil.slide.qc import draw_qc
from pathmil.slide.reader import Slide
from pathmil.slide.tilefile import TileSet, write_tiles
from pathmil.slide.tiling import tile_grid
from pathmil.slide.tissue import TISSUE_PRESETS, TissueConfig, segment_tissue

if TYPE_CHECKING:  # pandas is imported where a table is used: it would double `pathmil tile SLIDE`'s start-up
    import pandas as pd


TissueOverrides = partial(TissueConfig, "TissueOverrides")


class TileConfig(Settings):
    """How a slide becomes a grid of tiles: a physical tile size and a tissue filter."""

    section = "tile"
    target_mpp: float = Field(0.5, gt=0, description="tile resolution in um/px")
    tile_px: int = Field(256, ge=8, description="tile side in pixels at target_mpp")
    overlap: float = Field(
        0.0, ge=0, lt=1, description="fraction of a tile shared with its neighbour, [0, 1)"
    )
    min_tissue: float = Field(
        0.25, ge=0, le=1, description="keep tiles whose tissue fraction is at least this"
    )
    preset: Literal["tcga", "bwh_biopsy", "bwh_resection"] = Field(
        "tcga", description="CLAM's tissue segmentation preset"
    )
    tissue: TissueOverrides = Field(  # type: ignore[valid-type]
        default_factory=TissueOverrides, description="overrides of the preset's parameters (CLAM's names)"
    )
    default_mpp: float | None = Field(
        None, gt=0, description="um/px for slides whose metadata and cohort table give none"
    )
    qc_max_px: int = Field(2048, ge=64, description="longest side of the QC picture in pixels")

    def tissue_params(self) -> TissueConfig:
        """The preset's segmentation parameters with this config's overrides applied."""
        overrides = self.tissue.model_dump(exclude_none=True)
        return TissueConfig.build({**TISSUE_PRESETS[self.preset].model_dump(), **overrides}, "tile.tissue")

    def tiling(self) -> dict[str, Any]:
        """What decides which tiles a slide gets, as plain data: resolution, size, overlap, tissue filter and
        the resolved segmentation parameters. Tiles files, bags, checkpoints and packages record it, so
        features of another tiling are recognised (:func:`pathmil.slide.tilefile.tiling_of`); ``default_mpp`` and the QC size are
        left out (they change no tile of a slide that has its resolution)."""
        return {
            "target_mpp": self.target_mpp,
            "tile_px": self.tile_px,
            "overlap": self.overlap,
            "min_tissue": self.min_tissue,
            "preset": self.preset,
            "tissue": self.tissue_params().to_dict(),
        }

    @classmethod
    def from_tiling(cls, tiling: dict[str, Any], **extra: Any) -> TileConfig:
        """The settings that make ``tiling`` (as :meth:`tiling` wrote it), with ``extra`` settings."""
        return cls.build(
            {
                **{key: tiling[key] for key in ("target_mpp", "tile_px", "overlap", "min_tissue", "preset")},
                "tissue": tiling.get("tissue") or {},
                **extra,
            },
            "tile",
        )


@dataclass
class TileResult:
    """What tiling one slide produced, and the facts worth keeping about it."""

    tiles: TileSet
    qc_image: np.ndarray | None
    facts: dict[str, Any] = field(default_factory=dict)


def compute_tiles(slide: Slide, config: TileConfig, qc: bool = True) -> TileResult:
    """Segment tissue and lay the tile grid; pure computation, nothing written.

    The QC picture is drawn only with ``qc``: without a picture to write, drawing it is wasted time.
    """
    params = config.tissue_params()
    warnings: list[str] = []
    timings: dict[str, float] = {}
    start = time.perf_counter()

    seg_level = slide.level_for_downsample(params.seg_downsample)
    thumbnail, seg_downsample = slide.read_thumbnail(params.seg_downsample)
    timings["read_segmentation_level"] = time.perf_counter() - start
    tissue = segment_tissue(thumbnail, seg_downsample, params)

    geometry = slide.tile_geometry(config.target_mpp, config.tile_px)
    if slide.mpp > config.target_mpp * 1.01:
        warnings.append(
            f"slide resolution {slide.mpp:.3g} um/px is coarser than target {config.target_mpp} "
            "um/px: tiles are upsampled"
        )
    step0 = geometry.size_level0 * (1 - config.overlap)
    coords, fractions = tile_grid(
        tissue, slide.dimensions, geometry.size_level0, config.overlap, config.min_tissue
    )
    timings["segment_and_grid"] = time.perf_counter() - start - timings["read_segmentation_level"]
    if len(coords) == 0:
        raise SlideError(
            slide.slide_id,
            f"no {config.tile_px} px tile at {config.target_mpp} um/px has at least "
            f"{config.min_tissue:.0%} tissue (kept tissue covers {tissue.tissue_fraction:.1%} of the "
            f"slide after dropping pieces under a_t={params.a_t:g} reference patches of 512x512 "
            "level-0 px); lower --min-tissue or try another --preset",
        )
    if slide.mpp_source != "metadata":
        warnings.append(f"no mpp in the slide's metadata: used {slide.mpp} um/px from the {slide.mpp_source}")

    # what is known about the slide and its grid, written once: the HDF5 attributes and the facts JSON
    # are both made from it
    record = {
        "slide_id": slide.slide_id,
        "slide_path": str(slide.path),
        "tile_px": config.tile_px,
        "target_mpp": config.target_mpp,
        "slide_mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "min_tissue": config.min_tissue,
        "preset": config.preset,
    }
    coords_attrs = {
        "patch_size": geometry.read_px,
        "patch_level": geometry.level,
        "patch_size_level0": geometry.patch_size_level0,
        "level0_width": slide.dimensions[0],
        "level0_height": slide.dimensions[1],
        "level0_magnification": slide.magnification,
        "downsample": slide.level_downsamples[geometry.level],
        "target_mpp": config.target_mpp,
        "tile_px": config.tile_px,
        "overlap": config.overlap,
        "slide_mpp": slide.mpp,
        "name": slide.slide_id,
    }
    attrs = {"pathmil_version": __version__, **record, "tiling": json.dumps(config.tiling(), sort_keys=True)}
    tiles = TileSet(coords=coords, coords_attrs=coords_attrs, attrs=attrs, tissue_fraction=fractions)
    qc_image = (
        draw_qc(thumbnail, tissue, coords, geometry.size_level0, step0, config.qc_max_px) if qc else None
    )
    timings["total"] = time.perf_counter() - start
    facts = {
        **record,
        "path": record["slide_path"],
        "mpp": record["slide_mpp"],
        "status": "ok",
        "n_tiles": len(coords),
        "read_level": geometry.level,
        "read_px": geometry.read_px,
        "tile_size_level0": geometry.size_level0,
        "segmentation_level": seg_level,
        "segmentation_downsample": seg_downsample,
        "tissue_fraction": tissue.tissue_fraction,
        "n_tissue_regions": len(tissue.contours),
        "level0_size": list(slide.dimensions),
        "seconds": {k: round(v, 4) for k, v in timings.items()},
        "warnings": warnings,
        "tiling": config.tiling(),
    }
    return TileResult(tiles=tiles, qc_image=qc_image, facts=facts)


def tile_slide(
    path: str | os.PathLike,
    out: str | os.PathLike,
    config: TileConfig,
    qc: str | os.PathLike | None = None,
    facts: str | os.PathLike | None = None,
    slide_id: str | None = None,
    mpp: float | None = None,
    mpp_source: str = "argument",
) -> dict[str, Any]:
    """Tile one slide and write its tiles file, QC picture and facts JSON (default: ``out`` with .json).

    Nothing is written when any step fails, so a rerun never finds half an output.
    """
    with Slide(path, slide_id=slide_id, mpp=mpp, mpp_source=mpp_source) as slide:
        result = compute_tiles(slide, config, qc=qc is not None)
    facts_path = Path(facts) if facts is not None else Path(out).with_suffix(".json")
    write_start = time.perf_counter()
    if qc is not None and result.qc_image is not None:
        with atomic_output(qc) as tmp:
            write_png(str(tmp), result.qc_image)
    write_tiles(out, result.tiles)
    result.facts["seconds"]["write"] = round(time.perf_counter() - write_start, 4)
    write_json(facts_path, result.facts)
    return result.facts


def tile_cohort(
    slides: pd.DataFrame,
    out_dir: str | os.PathLike,
    config: TileConfig,
    qc_dir: str | os.PathLike | None = None,
    skip_errors: bool = False,
    failures: str | os.PathLike | None = None,
    default_mpp: float | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Tile every slide of a table (``slide_id``, ``path``, optional ``mpp``) into ``out_dir``.

    With ``skip_errors`` a failing slide is recorded and the rest go on; the failures table (default
    ``out_dir/failures.csv``) is always written, empty when all succeeded. Returns the facts of each slide.
    """
    import pandas as pd

    out_dir = Path(out_dir)

    def work(row: Any) -> dict[str, Any]:
        table_mpp = getattr(row, "mpp", None)
        use_table = table_mpp is not None and not pd.isna(table_mpp)
        return tile_slide(
            row.path,
            out_dir / f"{row.slide_id}.h5",
            config,
            qc=Path(qc_dir) / f"{row.slide_id}.png" if qc_dir else None,
            slide_id=row.slide_id,
            mpp=float(table_mpp) if use_table else default_mpp,
            mpp_source="table" if use_table else "argument",
        )

    failures_path = Path(failures) if failures else out_dir / "failures.csv"
    records = run_batch(slides.itertuples(index=False), work, "tile", failures_path, skip_errors, progress)
    return pd.DataFrame(records)
