"""Quality-control picture of a tiled slide: thumbnail, tissue contours, holes and kept tiles, and a caption
that says where the mask came from.

A person checks segmentation by looking, so every tiled slide gets one PNG. Kept tiles are tinted with
their grid lines drawn, computed with array operations (no per-tile drawing calls) so the picture costs a
few milliseconds even for 100,000 tiles. The caption band below the slide names the mask's source
(automatic, with the preset, or the given GeoJSON file) and the number of tiles; the slide's pixels keep
their place (picture pixel (col, row) is level-0 pixel (col, row) x the picture's downsample).
"""

from __future__ import annotations

import cv2
import numpy as np

from pathmil.slide.tissue import TissueMask

CONTOUR_RGB = (0, 160, 0)
HOLE_RGB = (0, 0, 255)
TILE_RGB = (0, 90, 255)
MIN_GRID_PX = 6  # draw the grid between tiles only when a tile is at least this wide in the picture
# Kept tiles are tinted as 0.75 * pixel + 0.25 * TILE_RGB (truncated), one table row per channel value.
TINT_LUT = (
    (0.75 * np.arange(256)[:, None, None] + 0.25 * np.array(TILE_RGB)).astype(np.uint8).reshape(256, 1, 3)
)


CAPTION_PX = 22  # height of one caption line at a picture width of 600 px or less
Pair = tuple[float, float]


def draw_qc(
    thumbnail: np.ndarray,
    tissue: TissueMask,
    coords: np.ndarray,
    size0: Pair,
    step0: Pair,
    max_px: int = 2048,
    caption: str = "",
) -> np.ndarray:
    """Return an RGB picture of ``thumbnail`` (taken at ``tissue.downsample``) with contours and tiles, and
    ``caption`` in a band below. ``size0`` and ``step0`` are the tiles' level-0 (x, y) size and stride."""
    scale = min(1.0, max_px / max(thumbnail.shape[:2]))
    image = thumbnail
    if scale < 1.0:
        size = (max(1, round(thumbnail.shape[1] * scale)), max(1, round(thumbnail.shape[0] * scale)))
        image = cv2.resize(thumbnail, size, interpolation=cv2.INTER_AREA)
    image = np.ascontiguousarray(image).copy()
    downsample = tissue.downsample / scale  # level-0 pixels per picture pixel
    _paint_tiles(image, coords, size0, step0, downsample)
    thickness = max(1, round(max(image.shape[:2]) / 600))
    if tissue.contours:
        contours = [np.round(c * scale).astype(np.int32) for c in tissue.contours]
        cv2.drawContours(image, contours, -1, CONTOUR_RGB, thickness)
        holes = [np.round(h * scale).astype(np.int32) for hs in tissue.holes for h in hs]
        if holes:
            cv2.drawContours(image, holes, -1, HOLE_RGB, thickness)
    return add_caption(image, caption) if caption else image


def add_caption(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` with ``text`` below it on a white band, wrapped to the picture's width."""
    import textwrap

    scale = max(1.0, image.shape[1] / 600)
    font_scale, line_px = 0.45 * scale, round(CAPTION_PX * scale)
    chars = max(20, int(image.shape[1] / (7 * scale)))  # Hershey simplex: about 6.5 px a character
    lines = [part for paragraph in text.splitlines() for part in textwrap.wrap(paragraph, chars)]
    band = np.full((line_px * len(lines) + line_px // 3, image.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(
            band, line, (4, line_px * (i + 1) - line_px // 4), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
            (30, 30, 30), max(1, round(scale)), cv2.LINE_AA,
        )  # fmt: skip
    return np.concatenate([image, band])


def _paint_tiles(image: np.ndarray, coords: np.ndarray, size0: Pair, step0: Pair, downsample: float) -> None:
    """Tint the kept tiles and draw the grid lines between them, in place."""
    if len(coords) == 0:
        return
    height, width = image.shape[:2]
    cols, rows = (
        np.round(coords[:, 0] / step0[0]).astype(np.int64),
        np.round(coords[:, 1] / step0[1]).astype(np.int64),
    )
    kept = np.zeros((rows.max() + 2, cols.max() + 2), bool)
    kept[rows, cols] = True
    # The grid cell under each picture pixel (a pixel beyond the last tile's far edge belongs to no tile).
    px_x = np.arange(width) * downsample
    px_y = np.arange(height) * downsample
    cell_x = np.minimum(np.floor(px_x / step0[0]).astype(np.int64), kept.shape[1] - 1)
    cell_y = np.minimum(np.floor(px_y / step0[1]).astype(np.int64), kept.shape[0] - 1)
    inside_x = (px_x - cell_x * step0[0]) < size0[0]
    inside_y = (px_y - cell_y * step0[1]) < size0[1]
    # Two 1-D takes and an outer product, not a 2-D fancy index: 5x faster on a 640 x 640 picture.
    covered = kept[cell_y][:, cell_x] & inside_y[:, None] & inside_x[None, :]
    if min(step0) / downsample >= MIN_GRID_PX:
        edge_x = np.r_[True, np.diff(cell_x) != 0]
        edge_y = np.r_[True, np.diff(cell_y) != 0]
        edges = covered & (edge_y[:, None] | edge_x[None, :])
    else:  # tiles a few pixels wide: grid lines would cover the tissue; outline the tiled area instead
        mask = covered.view(np.uint8)
        edges = covered & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).view(bool)
    # Masked copies with OpenCV: numpy's boolean indexing costs 30x more here.
    cv2.copyTo(cv2.LUT(image, TINT_LUT), covered.view(np.uint8), image)
    solid = cv2.merge([np.full((height, width), value, np.uint8) for value in TILE_RGB])  # 20x np.full's
    cv2.copyTo(solid, edges.view(np.uint8), image)
