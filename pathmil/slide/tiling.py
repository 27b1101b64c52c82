"""The tile grid: square tiles of a physical size, kept where the tissue mask covers enough of them.

The grid is laid over the whole slide from its top-left corner (so coordinates are reproducible and tiles
of neighbouring contours never overlap) and each tile's tissue fraction is read from a summed-area table of
the mask: constant time per tile, so a 100,000-tile slide costs milliseconds, not a Python loop over
contours as in CLAM's point-in-contour tests.

Edges: the grid runs until the slide is covered, so the last column and row of tiles may cross the slide's
right and bottom edges (tissue there would otherwise never be tiled). The part of such a tile beyond the
edge counts as glass in its tissue fraction and reads as white pixels (:func:`pathmil.slide.reader.rgba_to_rgb`)
in tiling, extraction and heatmaps alike. Sizes and steps are per axis: with non-square pixels a square
tile in micrometres covers a different number of level-0 pixels along x and y.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from pathmil.slide.tissue import TissueMask


def grid_positions(length0: int, size0: float, step0: float) -> np.ndarray:
    """Level-0 start positions of tiles of ``size0`` every ``step0`` that together cover ``length0`` pixels;
    the last may cross the edge. None when the slide is shorter than one tile."""
    if size0 > length0 + 1e-9:
        return np.zeros(0, dtype=np.int64)
    count = math.ceil((length0 - size0) / step0 - 1e-9) + 1
    return np.round(np.arange(count) * step0).astype(np.int64)


def tissue_fractions(
    tissue: TissueMask, xs: np.ndarray, ys: np.ndarray, size0: tuple[float, float]
) -> np.ndarray:
    """Fraction of each tile (all x, y combinations, shape len(ys) x len(xs)) that the mask calls tissue;
    the part of a tile beyond the slide's edge counts as no tissue."""
    mask = tissue.mask
    integral = cv2.integral(mask, sdepth=cv2.CV_64F)  # (H + 1) x (W + 1)
    height, width = mask.shape
    ds = tissue.downsample

    def bounds(starts: np.ndarray, size: float, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(starts / ds), 0, limit - 1).astype(np.int64)
        hi_all = np.maximum(np.ceil((starts + size) / ds).astype(np.int64), lo + 1)  # unclipped: its area
        return lo, np.minimum(hi_all, limit), hi_all - lo

    x0, x1, wx = bounds(xs, size0[0], width)
    y0, y1, wy = bounds(ys, size0[1], height)
    sums = (
        integral[np.ix_(y1, x1)]
        - integral[np.ix_(y0, x1)]
        - integral[np.ix_(y1, x0)]
        + integral[np.ix_(y0, x0)]
    )
    return sums / np.outer(wy, wx)


def tile_grid(
    tissue: TissueMask,
    level0_size: tuple[int, int],
    size0: float | tuple[float, float],
    overlap: float,
    min_tissue: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (N x 2, level-0 top-left x, y, row-major) and tissue fractions of the kept tiles.

    ``size0`` is the tile's level-0 (width, height), or one number for both.
    """
    size = (float(size0), float(size0)) if np.isscalar(size0) else (float(size0[0]), float(size0[1]))
    xs = grid_positions(level0_size[0], size[0], size[0] * (1.0 - overlap))
    ys = grid_positions(level0_size[1], size[1], size[1] * (1.0 - overlap))
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    fractions = tissue_fractions(tissue, xs, ys, size)
    # A tile with a tiny tissue fraction is never kept, even with min_tissue 0: it would be pure glass.
    keep_rows, keep_cols = np.nonzero((fractions >= min_tissue) & (fractions > 0))
    coords = np.stack([xs[keep_cols], ys[keep_rows]], axis=1).astype(np.int64)
    return coords, fractions[keep_rows, keep_cols].astype(np.float32)
