"""The fast paths of tiling give the same results as the obvious code they replaced.

Segmentation's thresholded median is a box-filter majority vote, and the QC picture is painted with
OpenCV masked copies and a lookup table; both are checked pixel for pixel against the direct formulas, on
random images and on the real H&E slide.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pathmil.fileio import write_png
from pathmil.slide.qc import TILE_RGB, _paint_tiles
from pathmil.slide.reader import Slide
from pathmil.slide.tile import TileConfig, compute_tiles, tile_slide
from pathmil.slide.tilefile import read_tiles
from pathmil.slide.tiling import tile_grid
from pathmil.slide.tissue import median_threshold, segment_tissue


@pytest.fixture(scope="module")
def cmu_rgb(slides_dir) -> np.ndarray:
    with Slide(slides_dir / "cmu_small_region.svs") as slide:
        return slide.read_level(0)


def test_median_threshold_equals_median_blur_then_threshold(cmu_rgb):
    rng = np.random.default_rng(0)
    images = [cv2.cvtColor(cmu_rgb[:800, 800:1800], cv2.COLOR_RGB2HSV)[..., 1]]  # tissue and glass
    for _ in range(60):
        height, width = rng.integers(1, 50, 2)
        high = int(rng.choice([20, 256]))  # low values crowd the threshold, so ties are frequent
        images.append(rng.integers(0, high, (height, width)).astype(np.uint8))
    for i, image in enumerate(images):
        for ksize in (1, 3, 5, 7, 11, 15):
            thresh = 8 if i == 0 else int(rng.integers(0, 20))
            expected = cv2.threshold(cv2.medianBlur(image, ksize), thresh, 255, cv2.THRESH_BINARY)[1]
            np.testing.assert_array_equal(median_threshold(image, ksize, thresh, 255), expected)


def reference_paint(image, coords, size0, step0, downsample):
    """The QC tiles painted with plain numpy: covered pixels tinted, the first row/column of each cell in
    the tile colour."""
    height, width = image.shape[:2]
    cols, rows = np.round(coords[:, 0] / step0).astype(int), np.round(coords[:, 1] / step0).astype(int)
    kept = np.zeros((rows.max() + 2, cols.max() + 2), bool)
    kept[rows, cols] = True
    px_x, px_y = np.arange(width) * downsample, np.arange(height) * downsample
    cell_x = np.minimum(np.floor(px_x / step0).astype(int), kept.shape[1] - 1)
    cell_y = np.minimum(np.floor(px_y / step0).astype(int), kept.shape[0] - 1)
    inside = ((px_y - cell_y * step0) < size0)[:, None] & ((px_x - cell_x * step0) < size0)[None, :]
    covered = kept[cell_y[:, None], cell_x[None, :]] & inside
    first = np.r_[True, np.diff(cell_y) != 0][:, None] | np.r_[True, np.diff(cell_x) != 0][None, :]
    out = image.copy()
    out[covered] = (0.75 * out[covered] + 0.25 * np.array(TILE_RGB, np.float32)).astype(np.uint8)
    out[covered & first] = TILE_RGB
    return out


@pytest.mark.parametrize("overlap, downsample", [(0.0, 4.0), (0.5, 3.7)])
def test_qc_tiles_painted_as_the_direct_formula(cmu_rgb, overlap, downsample):
    thumbnail = cv2.resize(cmu_rgb, None, fx=1 / downsample, fy=1 / downsample, interpolation=cv2.INTER_AREA)
    tissue = segment_tissue(thumbnail, downsample, TileConfig().tissue_params(), pixel_um2=0.499**2)
    size0 = 100.0
    coords, _ = tile_grid(tissue, (cmu_rgb.shape[1], cmu_rgb.shape[0]), size0, overlap, 0.25)
    assert len(coords) > 50
    step0 = size0 * (1 - overlap)
    painted = thumbnail.copy()
    _paint_tiles(painted, coords, (size0, size0), (step0, step0), downsample)
    expected = reference_paint(thumbnail, coords, size0, step0, downsample)
    assert (expected != thumbnail).any(axis=-1).mean() > 0.1  # the picture really changed
    np.testing.assert_array_equal(painted, expected)


def test_qc_png_is_lossless(cmu_rgb, tmp_path):
    picture = cmu_rgb[:700, 300:1000]
    write_png(str(tmp_path / "qc.png"), picture)
    read_back = cv2.cvtColor(cv2.imread(str(tmp_path / "qc.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read_back, picture)


def test_no_qc_picture_drawn_or_written_without_qc(slides_dir, tmp_path):
    config = TileConfig()
    with Slide(slides_dir / "cmu_small_region.svs") as slide:
        bare = compute_tiles(slide, config, qc=False)
    assert bare.qc_image is None
    tile_slide(slides_dir / "cmu_small_region.svs", tmp_path / "t.h5", config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.geojson", "t.h5", "t.json"]
    np.testing.assert_array_equal(read_tiles(tmp_path / "t.h5").coords, bare.tiles.coords)
