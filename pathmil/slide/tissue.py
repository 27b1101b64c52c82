"""Tissue segmentation on a low-resolution level: CLAM's recipe with its parameter names.

Saturation separates stained tissue from the white glass: RGB -> HSV, saturation channel, median blur,
fixed or Otsu threshold, morphological closing, then contours with holes (a two-level hierarchy) filtered by
area (Lu et al., "Data-efficient and weakly supervised computational pathology on whole-slide images",
Nat. Biomed. Eng. 2021). On top of CLAM:

- Areas are physical. CLAM counts them in reference patches of 512 x 512 *level-0 pixels*, so one preset
  keeps a 4x larger area on a 20x scan than on a 40x scan of the same tissue. Here a reference patch is
  128 x 128 um (CLAM's 512 px at 0.25 um/px, a 40x scan): a_t and a_h keep CLAM's numbers, and a 20x and a
  40x scan of one tissue keep the same pieces.
- No slide with tissue loses all of it: when no piece reaches ``a_t``, the pieces that can hold a tile are
  kept (else the largest), with a warning.
- ``remove_artifacts`` drops pen ink and black borders, which have high saturation too and would
  otherwise be tiled as tissue.
- The mask can be given instead (:func:`read_geojson_mask`), and is written as GeoJSON
  (:func:`tissue_geojson`) for QuPath and other viewers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from pathmil.errors import PathmilError
from pathmil.settings import Settings

# CLAM's reference patch (512 px) on a 40x scan (0.25 um/px), in micrometres: the unit of a_t and a_h.
REFERENCE_PATCH_UM = 128.0
REFERENCE_AREA_UM2 = REFERENCE_PATCH_UM**2


class TissueConfig(Settings):
    """Tissue segmentation parameters, with CLAM's names (Lu et al., Nat. Biomed. Eng. 2021).

    Areas ``a_t`` and ``a_h`` count reference patches of 128 x 128 um (16,384 um^2): CLAM's 512 x 512
    level-0 pixels on a 40x (0.25 um/px) scan, fixed in micrometres so that scans at any resolution keep
    the same pieces.
    """

    section = "tile.tissue"
    sthresh: int = Field(8, ge=0, le=255, description="saturation threshold (0-255) when Otsu is off")
    sthresh_up: int = Field(255, ge=1, le=255, description="value written for tissue in the binary mask")
    mthresh: int = Field(7, ge=1, description="median blur kernel size (odd)")
    close: int = Field(
        4, ge=0, description="side of the square closing kernel, in segmentation-level pixels; 0: off"
    )
    use_otsu: bool = Field(False, description="Otsu's threshold on the blurred saturation instead of sthresh")
    a_t: float = Field(
        1,
        ge=0,
        description="minimum tissue area (minus holes) of a kept piece, in reference patches of 128 x 128 um",
    )
    a_h: float = Field(
        1, ge=0, description="minimum area of a kept hole, in reference patches of 128 x 128 um"
    )
    max_n_holes: int = Field(8, ge=0, description="keep at most this many (largest) holes per tissue piece")
    seg_downsample: float = Field(
        64, gt=0, description="segment at the pyramid level closest to this downsample"
    )
    remove_artifacts: bool = Field(
        False, description="drop pen marks (blue, green, black ink) and black borders"
    )


# CLAM's presets, under CLAM's names and with CLAM's values, for users who carry their settings over (areas
# in 128 um reference patches, see TissueConfig), and pathmil's default (tile.py says why).
TISSUE_PRESETS: dict[str, TissueConfig] = {
    "pathmil": TissueConfig(),  # the defaults above: tcga's thresholds, areas of one default tile
    "tcga": TissueConfig(sthresh=8, mthresh=7, close=4, a_t=16, a_h=4, max_n_holes=8),
    "bwh_biopsy": TissueConfig(sthresh=15, mthresh=11, close=2, a_t=1, a_h=1, max_n_holes=2),
    "bwh_resection": TissueConfig(sthresh=15, mthresh=11, close=4, a_t=100, a_h=16, max_n_holes=8),
}


@dataclass
class TissueMask:
    """The tissue of a slide at the segmentation level.

    ``mask`` is 1 on kept tissue (holes excluded); ``contours`` and ``holes`` are in segmentation-level
    pixels, ``holes[i]`` belonging to ``contours[i]``; ``downsample`` maps them to level 0. ``source`` is
    ``automatic`` (segmented) or ``given`` (read from ``source_file``); ``warnings`` say what the user
    should know (pieces kept below ``a_t``).
    """

    mask: np.ndarray
    contours: list[np.ndarray]
    holes: list[list[np.ndarray]]
    downsample: float
    source: str = "automatic"
    source_file: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def artifact_mask(rgb: np.ndarray) -> np.ndarray:
    """True where a pixel is pen ink (blue, green, black) or a black scanner border.

    Stains are pink to purple (hue about 120-180 degrees in OpenCV's 0-180 scale, or near 0); blue and
    green ink sit at hues 35-125 with strong saturation; black ink and borders are dark whatever their hue.
    The thresholds were chosen to leave haematoxylin-dense nuclei (dark purple, value above 60) as tissue.
    """
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured_ink = (hue >= 35) & (hue <= 125) & (sat >= 60) & (val >= 30)
    dark = val < 50
    mask = (coloured_ink | dark).astype(np.uint8)
    # Ink strokes have soft edges; widen them a little so their rims are not kept as faint tissue.
    return cv2.dilate(mask, np.ones((3, 3), np.uint8)).astype(bool)


def median_threshold(image: np.ndarray, ksize: int, thresh: float, maxval: int) -> np.ndarray:
    """``maxval`` where the ``ksize`` x ``ksize`` median of ``image`` exceeds ``thresh``, else 0.

    The same mask as ``cv2.threshold(cv2.medianBlur(image, ksize), thresh, maxval, THRESH_BINARY)``, found
    as a majority vote: a window's median exceeds ``thresh`` exactly when more than half of its values do,
    so a box count of ``image > thresh`` suffices. OpenCV's median for kernels above 5 is a per-pixel
    histogram walk, 10-30x slower than this box filter, and it dominated segmentation time. Borders
    replicate, as ``cv2.medianBlur`` does.
    """
    above = (image > thresh).astype(np.uint8)
    votes = cv2.boxFilter(above, cv2.CV_16U, (ksize, ksize), normalize=False, borderType=cv2.BORDER_REPLICATE)
    return np.where(votes > ksize * ksize // 2, maxval, 0).astype(np.uint8)


def segment_tissue(
    rgb: np.ndarray,
    downsample: float,
    params: TissueConfig,
    pixel_um2: float,
    tile_um2: float = REFERENCE_AREA_UM2,
) -> TissueMask:
    """Segment tissue in an RGB image taken at ``downsample`` relative to level 0.

    ``pixel_um2`` is the area of one level-0 pixel (mpp_x * mpp_y); ``tile_um2`` that of one tile, the
    smallest piece worth keeping when no piece reaches ``a_t``.
    """
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    ksize = max(1, int(params.mthresh) | 1)  # median blur needs an odd kernel
    if params.use_otsu:
        sat = cv2.medianBlur(sat, ksize)
        _, binary = cv2.threshold(sat, 0, params.sthresh_up, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        binary = median_threshold(sat, ksize, params.sthresh, params.sthresh_up)
    if params.remove_artifacts:
        binary[artifact_mask(rgb)] = 0
    if params.close > 0:
        kernel = np.ones((params.close, params.close), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    px_um2 = pixel_um2 * downsample**2  # area of one segmentation-level pixel
    contours, holes, warnings = _filter_contours(binary, px_um2, params, tile_um2)
    return TissueMask(
        mask=fill_mask(binary.shape, contours, holes),
        contours=contours,
        holes=holes,
        downsample=downsample,
        warnings=warnings,
    )


def fill_mask(
    shape: tuple[int, ...], contours: list[np.ndarray], holes: list[list[np.ndarray]]
) -> np.ndarray:
    """1 inside the contours, 0 in their holes and elsewhere (uint8, ``shape``).

    Each piece is filled, then its own holes cut, before the next piece: a piece lying in another piece's
    hole (an island in a lake) stays."""
    mask = np.zeros(shape[:2], np.uint8)
    for contour, contour_holes in zip(contours, holes):
        if not contour_holes:
            cv2.drawContours(mask, [contour], -1, 1, thickness=cv2.FILLED)
            continue
        piece = np.zeros_like(mask)
        cv2.drawContours(piece, [contour], -1, 1, thickness=cv2.FILLED)
        cv2.drawContours(piece, contour_holes, -1, 0, thickness=cv2.FILLED)
        mask |= piece
    return mask


def _filter_contours(
    binary: np.ndarray, px_um2: float, params: TissueConfig, tile_um2: float
) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[str]]:
    """Keep tissue contours of at least ``a_t`` (net of holes) and their largest holes above ``a_h``.

    When no piece reaches ``a_t``, keep those that can hold a tile (at least ``tile_um2``), else the
    largest, and say so: a slide with tissue never loses all of it to the area filter.
    """
    found, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return [], [], []
    hierarchy = hierarchy[0]  # rows: next, previous, first child, parent
    min_tissue, min_hole = params.a_t * REFERENCE_AREA_UM2, params.a_h * REFERENCE_AREA_UM2
    pieces = []  # (net area um^2, contour index, [(hole area um^2, hole index)])
    for idx in np.flatnonzero(hierarchy[:, 3] == -1):  # outer boundaries
        children = [(cv2.contourArea(found[c]) * px_um2, c) for c in np.flatnonzero(hierarchy[:, 3] == idx)]
        net = cv2.contourArea(found[idx]) * px_um2 - sum(a for a, _ in children)
        if net > 0:
            pieces.append((net, idx, children))
    kept = [p for p in pieces if p[0] >= min_tissue]
    warnings = []
    if pieces and not kept:
        pieces.sort(key=lambda p: -p[0])
        kept = [p for p in pieces if p[0] >= tile_um2]
        which = (
            f"kept the {len(kept)} of {len(pieces)} pieces that can hold a tile ({mm2(tile_um2)} or more)"
            if kept
            else f"no piece can hold a tile ({mm2(tile_um2)}): kept the largest of {len(pieces)}"
        )
        kept = kept or pieces[:1]
        warnings.append(
            f"no tissue piece reaches a_t = {params.a_t:g} reference patches ({mm2(min_tissue)}); {which}, "
            f"the largest {mm2(kept[0][0])}; check the QC picture, or lower tile.tissue.a_t"
        )
    contours, holes = [], []
    for _, idx, children in kept:
        big = sorted(((a, c) for a, c in children if a > min_hole), reverse=True)
        contours.append(found[idx])
        holes.append([found[c] for _, c in big[: params.max_n_holes]])
    return contours, holes, warnings


def mm2(area_um2: float) -> str:
    return f"{area_um2 / 1e6:.3g} mm^2"


# ------------------------------------------------------------------------------------------- GeoJSON


def _ring(points: np.ndarray, downsample: float, exterior: bool) -> list[list[float]] | None:
    """A closed GeoJSON ring in level-0 pixels from a contour in segmentation-level pixels (pixel centres:
    level-0 x = (x + 0.5) * downsample), wound as RFC 7946 asks (exterior counter-clockwise in x, y)."""
    xy = (points.reshape(-1, 2).astype(np.float64) + 0.5) * downsample
    if len(xy) < 3:
        return None
    signed = 0.5 * float(np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1]))
    if (signed < 0) == exterior:
        xy = xy[::-1]
    ring = np.round(xy, 1).tolist()
    return [*ring, ring[0]]


def tissue_geojson(tissue: TissueMask, slide_facts: dict[str, Any]) -> dict[str, Any]:
    """The tissue pieces as a GeoJSON FeatureCollection that QuPath opens: one Polygon annotation per piece,
    classified ``Tissue``, in level-0 pixel coordinates (x right, y down), holes as interior rings.
    ``slide_facts`` (slide id, level-0 size, um/px, mask source) go into the collection's ``pathmil``
    member, which viewers ignore."""
    features = []
    for number, (contour, contour_holes) in enumerate(zip(tissue.contours, tissue.holes), start=1):
        exterior = _ring(contour, tissue.downsample, exterior=True)
        if exterior is None:
            continue
        rings = [exterior] + [r for h in contour_holes if (r := _ring(h, tissue.downsample, False))]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "name": f"tissue {number}",
                    "classification": {"name": "Tissue", "color": [0, 160, 0]},
                    "isLocked": False,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features, "pathmil": slide_facts}


def _polygons(geometry: Any, where: str) -> list[list[Any]]:
    """The polygons (each a list of rings) of a GeoJSON geometry; points and lines are refused."""
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    if kind == "Polygon":
        return [geometry["coordinates"]]
    if kind == "MultiPolygon":
        return list(geometry["coordinates"])
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries", []) for p in _polygons(g, where)]
    raise PathmilError(f"{where}: a {kind} geometry has no area; draw tissue and regions as polygons")


def _ring_array(ring: Any) -> np.ndarray:
    """A GeoJSON ring as K x 2 floats (x, y; a third coordinate is dropped)."""
    array = np.asarray(ring, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"a ring of shape {array.shape}")
    return array[:, :2]


def read_geojson_polygons(path: str | os.PathLike, slide_id: str) -> list[list[np.ndarray]]:
    """The polygons of a GeoJSON file (a FeatureCollection, a Feature or a bare geometry, as QuPath and
    other tools export): each a list of rings (K x 2 float arrays, level-0 x, y), exterior first.

    Raises:
        PathmilError: unreadable, not GeoJSON, no polygon, or written by pathmil for another slide.
    """
    path = Path(path)
    where = f"tissue file {path}"
    if not path.is_file():
        raise PathmilError(f"{where} does not exist; check the cohort table's 'tissue' column or tissue_dir")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise PathmilError(f"{where} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise PathmilError(
            f"{where} is not JSON (line {err.lineno}: {err.msg}); export it as GeoJSON"
        ) from None
    if not isinstance(data, dict) or "type" not in data:
        raise PathmilError(f"{where} is not GeoJSON: expected an object with a 'type'")
    written_for = data["pathmil"].get("slide_id") if isinstance(data.get("pathmil"), dict) else None
    if written_for is not None and str(written_for) != slide_id:
        raise PathmilError(
            f"{where} was written for slide {written_for}, not {slide_id}; give this slide's file"
        )
    if data["type"] == "FeatureCollection":
        geometries = [f.get("geometry") for f in data.get("features", []) if isinstance(f, dict)]
    else:
        geometries = [data.get("geometry") if data["type"] == "Feature" else data]
    polygons = []
    try:
        for geometry in filter(None, geometries):
            for polygon in _polygons(geometry, where):
                rings = [_ring_array(r) for r in polygon]
                if rings and len(rings[0]) >= 3:
                    polygons.append(rings)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise PathmilError(f"{where}: malformed coordinates ({err}); export it again as GeoJSON") from None
    if not polygons:
        raise PathmilError(f"{where} holds no polygon; draw the tissue (or the region to tile) as polygons")
    return polygons


def read_geojson_mask(
    path: str | os.PathLike,
    slide_id: str,
    shape: tuple[int, int],
    downsample: float,
    level0_size: tuple[int, int],
) -> TissueMask:
    """A given tissue outline (or region of interest) from a GeoJSON file in level-0 pixels, drawn at the
    segmentation level (``shape``, ``downsample``) in place of the automatic mask.

    Raises:
        PathmilError: as :func:`read_geojson_polygons`, or when no polygon overlaps the slide.
    """
    polygons = read_geojson_polygons(path, slide_id)
    width, height = level0_size
    inside = [
        p
        for p in polygons
        if (p[0].max(axis=0) > 0).all() and p[0][:, 0].min() < width and p[0][:, 1].min() < height
    ]
    if not inside:
        raise PathmilError(
            f"tissue file {path}: no polygon lies on slide {slide_id} ({width} x {height} level-0 px); are its "
            "coordinates level-0 pixels of this slide?"
        )

    def scaled(ring: np.ndarray) -> np.ndarray:  # the inverse of _ring's pixel centres
        return np.round(ring / downsample - 0.5).astype(np.int32).reshape(-1, 1, 2)

    contours = [scaled(p[0]) for p in inside]
    holes = [[scaled(r) for r in p[1:]] for p in inside]
    return TissueMask(
        mask=fill_mask(shape, contours, holes),
        contours=contours,
        holes=holes,
        downsample=downsample,
        source="given",
        source_file=str(path),
    )
