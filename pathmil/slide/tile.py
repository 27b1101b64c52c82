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

import cv2
import numpy as np
from pydantic import Field

from pathmil import __version__
from pathmil.batch import run_batch
from pathmil.errors import PathmilError, SlideError
from pathmil.fileio import atomic_output, write_json, write_png
from pathmil.settings import Settings, partial
from pathmil.slide.qc import draw_qc
from pathmil.slide.reader import MPP_RANGE, MPP_SOURCES, Slide, TileGeometry, mpp_text
from pathmil.slide.tilefile import TileSet, write_tiles
from pathmil.slide.tiling import tile_grid
from pathmil.slide.tissue import (
    TISSUE_PRESETS,
    TissueConfig,
    TissueMask,
    mm2,
    read_geojson_mask,
    segment_tissue,
    tissue_geojson,
)

if TYPE_CHECKING:  # pandas is imported where a table is used: it would double `pathmil tile SLIDE`'s start-up
    import pandas as pd


TissueOverrides = partial(TissueConfig, "TissueOverrides")
PRESETS = Literal["pathmil", "tcga", "bwh_biopsy", "bwh_resection"]
EDGE = "white"  # what a tile crossing the slide's right or bottom edge holds beyond it (rgba_to_rgb)


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
    preset: PRESETS = Field(  # type: ignore[valid-type]
        "pathmil",
        description="tissue segmentation preset: pathmil's, or CLAM's tcga, bwh_biopsy, bwh_resection",
    )
    tissue: TissueOverrides = Field(  # type: ignore[valid-type]
        default_factory=TissueOverrides, description="overrides of the preset's parameters (CLAM's names)"
    )
    tissue_dir: str | None = Field(
        None,
        description="folder of given tissue outlines (GeoJSON, SLIDE_ID.geojson) used instead of the "
        "automatic mask of those slides",
    )
    default_mpp: float | None = Field(
        None,
        ge=MPP_RANGE[0],
        le=MPP_RANGE[1],
        description="um/px for slides whose metadata and cohort table give none",
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
    geojson: dict[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)


def check_holds_a_tile(slide: Slide, geometry: TileGeometry) -> None:
    """Refuse a slide smaller than one tile, giving both sizes in um and px."""
    width, height = slide.dimensions
    size_x, size_y = geometry.size_level0
    if width + 1e-6 >= size_x and height + 1e-6 >= size_y:
        return
    side = f"{geometry.size_um:g} x {geometry.size_um:g} um"
    raise SlideError(
        slide.slide_id,
        f"the slide is {width} x {height} px ({width * slide.mpp_x:.4g} x {height * slide.mpp_y:.4g} um "
        f"at {mpp_text(slide.mpp_xy)}), smaller than one tile of {geometry.tile_px} px at "
        f"{geometry.target_mpp:g} um/px ({side}, {size_x:.4g} x {size_y:.4g} slide px); "
        "use a smaller --tile-px or --target-mpp",
    )


def mpp_warning(slide: Slide) -> str | None:
    """What the user should know about where the um/px came from, if not from the metadata."""
    if slide.mpp_source == "metadata":
        return slide.mpp_note  # a given value the metadata overruled, or None
    why = slide.mpp_note or "no mpp in the slide's metadata"
    return f"{why}: used {mpp_text(slide.mpp_xy)} from {MPP_SOURCES[slide.mpp_source]}"


def mask_of(
    slide: Slide,
    thumbnail: np.ndarray,
    downsample: float,
    config: TileConfig,
    geometry: TileGeometry,
    given: str | os.PathLike | None,
) -> TissueMask:
    """The given tissue outline (GeoJSON) drawn at the segmentation level, else the automatic mask.

    Raises:
        SlideError: the given outline cannot be used (naming the file and why).
    """
    if given is None:
        return segment_tissue(
            thumbnail, downsample, config.tissue_params(), slide.mpp_x * slide.mpp_y, geometry.size_um**2
        )
    try:
        return read_geojson_mask(given, slide.slide_id, thumbnail.shape[:2], downsample, slide.dimensions)
    except PathmilError as err:  # name the slide, as every tiling failure does
        raise SlideError(slide.slide_id, str(err)) from None


def no_tiles_error(slide: Slide, config: TileConfig, tissue: TissueMask) -> SlideError:
    """Why no tile was kept, and what can help."""
    wanted = f"no {config.tile_px} px tile at {config.target_mpp} um/px has at least {config.min_tissue:.0%} tissue"
    if tissue.source == "given":
        return SlideError(
            slide.slide_id,
            f"{wanted} within the given outline {tissue.source_file} (it covers {tissue.tissue_fraction:.1%} "
            "of the slide); check the file's polygons, or lower --min-tissue",
        )
    if not tissue.contours:
        return SlideError(
            slide.slide_id,
            f"{wanted}: no tissue found (no saturation above sthresh={config.tissue_params().sthresh}); "
            "if the slide holds tissue, lower tile.tissue.sthresh or give its outline (--tissue-geojson)",
        )
    px_um2 = slide.mpp_x * slide.mpp_y * tissue.downsample**2
    largest = max(cv2.contourArea(c) for c in tissue.contours) * px_um2
    tile_um2 = (config.tile_px * config.target_mpp) ** 2
    return SlideError(
        slide.slide_id,
        f"{wanted} (the tissue found covers {tissue.tissue_fraction:.1%} of the slide, its largest piece "
        f"{mm2(largest)}, a tile {mm2(tile_um2)}); lower --min-tissue or --tile-px, or give the tissue "
        "outline (--tissue-geojson)",
    )


def compute_tiles(
    slide: Slide, config: TileConfig, qc: bool = True, tissue_file: str | os.PathLike | None = None
) -> TileResult:
    """Segment tissue (or read the given outline ``tissue_file``) and lay the tile grid; nothing written.

    The QC picture is drawn only with ``qc``: without a picture to write, drawing it is wasted time.
    """
    params = config.tissue_params()
    warnings: list[str] = []
    timings: dict[str, float] = {}
    start = time.perf_counter()
    geometry = slide.tile_geometry(config.target_mpp, config.tile_px)
    check_holds_a_tile(slide, geometry)

    seg_level = slide.level_for_downsample(params.seg_downsample)
    thumbnail, seg_downsample = slide.read_thumbnail(params.seg_downsample)
    timings["read_segmentation_level"] = time.perf_counter() - start
    tissue = mask_of(slide, thumbnail, seg_downsample, config, geometry, tissue_file)

    if max(slide.mpp_xy) > config.target_mpp * 1.01:
        warnings.append(
            f"slide resolution {mpp_text(slide.mpp_xy)} is coarser than target {config.target_mpp} "
            "um/px: tiles are upsampled"
        )
    size0 = geometry.size_level0
    step0 = (size0[0] * (1 - config.overlap), size0[1] * (1 - config.overlap))
    coords, fractions = tile_grid(tissue, slide.dimensions, size0, config.overlap, config.min_tissue)
    timings["segment_and_grid"] = time.perf_counter() - start - timings["read_segmentation_level"]
    if len(coords) == 0:
        raise no_tiles_error(slide, config, tissue)
    if note := mpp_warning(slide):
        warnings.append(note)
    warnings += tissue.warnings
    width, height = slide.dimensions
    n_edge = int(((coords[:, 0] + size0[0] > width + 1e-6) | (coords[:, 1] + size0[1] > height + 1e-6)).sum())

    # what is known about the slide and its grid, written once: the HDF5 attributes, the facts JSON and
    # the GeoJSON's `pathmil` member are made from it
    record = {
        "slide_id": slide.slide_id,
        "slide_path": str(slide.path),
        "slide_quickhash": slide.quickhash,
        "tile_px": config.tile_px,
        "target_mpp": config.target_mpp,
        "slide_mpp": slide.mpp,
        "slide_mpp_x": slide.mpp_x,
        "slide_mpp_y": slide.mpp_y,
        "mpp_source": slide.mpp_source,
        "min_tissue": config.min_tissue,
        "preset": config.preset,
        "mask_source": tissue.source,
        "mask_file": tissue.source_file,
        "edge": EDGE,
    }
    coords_attrs = {
        "patch_size": geometry.read_px,
        "patch_level": geometry.level,
        "patch_size_level0": geometry.patch_size_level0,
        "patch_size_xy": np.asarray(geometry.read_size, np.int64),
        "patch_size_level0_xy": np.asarray(geometry.size_level0, np.float64),
        "level0_width": width,
        "level0_height": height,
        "level0_magnification": slide.magnification,
        "downsample": slide.level_downsamples[geometry.level],
        "target_mpp": config.target_mpp,
        "tile_px": config.tile_px,
        "overlap": config.overlap,
        "slide_mpp": slide.mpp,
        "slide_mpp_x": slide.mpp_x,
        "slide_mpp_y": slide.mpp_y,
        "name": slide.slide_id,
    }
    attrs = {"pathmil_version": __version__, **record, "tiling": json.dumps(config.tiling(), sort_keys=True)}
    tiles = TileSet(coords=coords, coords_attrs=coords_attrs, attrs=attrs, tissue_fraction=fractions)
    mask_text = (
        f"given outline {Path(tissue.source_file).name}"
        if tissue.source_file
        else f"automatic ({config.preset} preset)"
    )
    caption = (
        f"{slide.slide_id}: {len(coords)} tiles of {geometry.size_um:g} um ({config.tile_px} px at "
        f"{config.target_mpp:g} um/px); tissue mask: {mask_text}"
        + "".join(f"\nwarning: {w}" for w in warnings)
    )
    qc_image = (
        draw_qc(thumbnail, tissue, coords, size0, step0, config.qc_max_px, caption=caption) if qc else None
    )
    geojson = tissue_geojson(
        tissue,
        {
            "pathmil_version": __version__,
            **{k: record[k] for k in ("slide_id", "slide_mpp_x", "slide_mpp_y", "mask_source", "mask_file")},
            "level0_size": [width, height],
            "units": "level-0 pixels (x right, y down)",
        },
    )
    timings["total"] = time.perf_counter() - start
    facts = {
        **record,
        "path": record["slide_path"],
        "mpp": record["slide_mpp"],
        "status": "ok",
        "n_tiles": len(coords),
        "n_edge_tiles": n_edge,
        "read_level": geometry.level,
        "read_px": geometry.read_px,
        "read_size": list(geometry.read_size),
        "tile_size_um": geometry.size_um,
        "tile_size_level0": list(size0),
        "segmentation_level": seg_level,
        "segmentation_downsample": seg_downsample,
        "tissue_fraction": tissue.tissue_fraction,
        "n_tissue_regions": len(tissue.contours),
        "level0_size": [width, height],
        "seconds": {k: round(v, 4) for k, v in timings.items()},
        "warnings": warnings,
        "tiling": config.tiling(),
    }
    return TileResult(tiles=tiles, qc_image=qc_image, geojson=geojson, facts=facts)


def given_tissue(slide_id: str, config: TileConfig, table_value: Any = None) -> Path | None:
    """The slide's given tissue outline: the cohort table's ``tissue`` value, else
    ``tissue_dir/SLIDE_ID.geojson`` when that file exists, else None (the automatic mask)."""
    if isinstance(table_value, (str, os.PathLike)) and str(table_value).strip():
        return Path(table_value)
    if config.tissue_dir is not None:
        candidate = Path(config.tissue_dir) / f"{slide_id}.geojson"
        if candidate.is_file():
            return candidate
    return None


def tile_slide(
    path: str | os.PathLike,
    out: str | os.PathLike,
    config: TileConfig,
    qc: str | os.PathLike | None = None,
    facts: str | os.PathLike | None = None,
    slide_id: str | None = None,
    mpp: float | None = None,
    mpp_source: str = "argument",
    tissue: str | os.PathLike | None = None,
    geojson: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Tile one slide and write its tiles file, QC picture, tissue GeoJSON (default: ``out`` with .geojson)
    and facts JSON (default: ``out`` with .json). ``tissue`` is a given outline (GeoJSON) to use instead of
    the automatic mask (default: :func:`given_tissue` from ``config.tissue_dir``). ``mpp`` is used when the
    slide's metadata has no plausible um/px; ``mpp_source`` says where it came from (a key of
    :data:`pathmil.slide.reader.MPP_SOURCES`), for the facts and the warnings.

    Nothing is written when any step fails, so a rerun never finds half an output.
    """
    facts_path = Path(facts) if facts is not None else Path(out).with_suffix(".json")
    geojson_path = Path(geojson) if geojson is not None else Path(out).with_suffix(".geojson")
    with Slide(path, slide_id=slide_id, mpp=mpp, mpp_source=mpp_source) as slide:
        tissue = tissue if tissue is not None else given_tissue(slide.slide_id, config)
        if tissue is not None and Path(tissue).resolve() == geojson_path.resolve():
            raise SlideError(
                slide.slide_id,
                f"the given tissue outline {tissue} is the GeoJSON this run writes (--geojson, by default "
                "the tiles file's name with .geojson); keep corrected outlines in another file or folder",
            )
        result = compute_tiles(slide, config, qc=qc is not None, tissue_file=tissue)
    write_start = time.perf_counter()
    if qc is not None and result.qc_image is not None:
        with atomic_output(qc) as tmp:
            write_png(str(tmp), result.qc_image)
    write_json(geojson_path, result.geojson)
    write_tiles(out, result.tiles)
    result.facts["tissue_geojson"] = str(geojson_path)
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
    default_source: str = "argument",
) -> pd.DataFrame:
    """Tile every slide of a table (``slide_id``, ``path``, optional ``mpp`` and ``tissue``) into ``out_dir``.

    A slide whose metadata has no um/px takes the table's ``mpp``, else ``default_mpp`` (``default_source``
    says where that came from: ``"argument"`` for --mpp, ``"default"`` for tile.default_mpp). With ``skip_errors`` a failing slide is recorded and the rest go on; the failures table (default
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
            mpp_source="table" if use_table else default_source,
            tissue=given_tissue(row.slide_id, config, getattr(row, "tissue", None)),
        )

    failures_path = Path(failures) if failures else out_dir / "failures.csv"
    records = run_batch(slides.itertuples(index=False), work, "tile", failures_path, skip_errors, progress)
    return pd.DataFrame(records)
