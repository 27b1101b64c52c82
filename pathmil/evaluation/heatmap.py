"""Heatmaps: where on the slide a model's prediction rests, and the tiles it rests on.

A model's instance scores (``MILOutput.instance_scores``: attention for ABMIL, the per-tile predictions of
the WeakSTIL instance regressor, the student's attention for MHIM-MIL, the pooling weights for MambaMIL)
are rank-normalised to percentiles, painted at their tiles' level-0 positions over a slide thumbnail,
optionally smoothed, and blended over the tissue, beside the plain thumbnail and a colour bar. Percentiles,
not raw scores, are painted because attention weights of a 20,000-tile bag are all tiny and skewed: their
ranks are what a reader compares (CLAM's heatmaps do the same, Lu et al., Nat. Biomed. Eng. 2021). A
montage shows the top-k and bottom-k tiles read from the slide at full resolution.

The painting is array arithmetic, not a drawing call per tile: each tile adds its value to the corners of
a 2-D difference array (a summed-area table in reverse, Crow, SIGGRAPH 1984) and two cumulative sums spread
it over the tile's rectangle, together with a count, so overlapping tiles are averaged, tiles may lie off
any grid, and the cost is O(pixels + tiles) (tens of milliseconds for 20,000 tiles). The tiling QC
picture's grid painter (:mod:`pathmil.slide.qc`) assumes tiles on one stride-aligned grid, which bags of
other tools (or overlapping tiles) need not keep.

A model trained on patient bags (a patient's slides joined) scores one slide's bag alone here: the
heatmap shows where, within this slide, the model looks.

Coordinates: level-0 pixels of the tiles' top-left corners, with the tile size from the bag's
``patch_size_level0_xy`` or ``patch_size_level0`` (pathmil, TRIDENT), from ``patch_size`` and
``patch_level`` (CLAM), or from the coordinate spacing. STAMP's coordinates and ``tile_size_um`` are
micrometres, converted with the slide's um/px along x and y (``--mpp`` when its metadata has none); slideflow's are tile centres, its tile size ``tile_um``. Tiles
crossing the slide's right or bottom edge are painted up to the edge, and montage tiles show white beyond
it, as tiling and extraction read them.

A bag painted on another slide is a silent wrong answer: a bag whose slide id, level-0 size or slide
fingerprint (OpenSlide's ``quickhash-1``, recorded at tiling and extraction) disagrees with the slide file
is refused in one line, unless ``force`` is set (then it is painted with a warning).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
from pydantic import Field, field_validator
from scipy import stats

from pathmil.data.bags import model_input
from pathmil.errors import PathmilError
from pathmil.evaluation.predict import check_bag
from pathmil.features.bagfile import Bag, read_bag, read_bag_attrs
from pathmil.fileio import atomic_output, write_picture
from pathmil.settings import Settings
from pathmil.slide.reader import Slide, resize
from pathmil.training.run import TrainedRun, load_run


class HeatmapConfig(Settings):
    """How ``pathmil heatmap`` paints instance scores over a slide and picks tiles for the montage."""

    section = "heatmap"
    max_px: int = Field(
        1024,
        ge=64,
        description="longest side of the thumbnail (and of the overlay) in pixels; the picture holds both "
        "side by side",
    )
    smooth: float = Field(
        0.0, ge=0, description="Gaussian smoothing of the painted scores, sigma in tiles; 0: off"
    )
    alpha: float = Field(0.5, ge=0, le=1, description="opacity of the colours over the tissue")
    cmap: str = Field("turbo", description="matplotlib colour map of the percentiles (low -> high)")
    top_k: int = Field(
        8, ge=1, description="tiles with the highest and with the lowest scores in the montage"
    )
    montage_px: int = Field(192, ge=16, description="side of each montage tile in pixels")
    jpeg_quality: int = Field(
        85, ge=1, le=100, description="JPEG quality of pictures written as .jpg (the workflow's)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="where the model runs")

    @field_validator("cmap")
    @classmethod
    def _known_cmap(cls, name: str) -> str:
        import matplotlib

        if name not in matplotlib.colormaps:
            raise ValueError(f"unknown colour map '{name}'; try turbo, viridis or jet")
        return name


log = logging.getLogger(__name__)

TITLE_PX = 40  # height of the title band of the heatmap picture (at a scale of 1, see PictureLayout)
GAP_PX = 8  # white space between the panels
BAR_PX = 100  # width of the colour bar panel (at a scale of 1)
MIN_HEIGHT_PX = 240  # the panels are padded to at least this height, so the colour bar stays readable
MAX_READ_PX = 64 * 2**20  # largest pyramid level (in pixels) read whole for the thumbnail
SMOOTH_SIGMA_PX = 4.0  # wider Gaussian kernels run on a shrunk copy of the map (see smooth)


# --------------------------------------------------------------------------------------- tile geometry


@dataclass
class TileLayout:
    """Where the tiles of a bag lie: level-0 top-left corners (N x 2, x, y) and the tile side."""

    coords: np.ndarray
    size0: float  # the tile's level-0 width
    size_inferred: bool = False
    size0_y: float | None = None  # its height, where it differs (non-square pixels)

    @property
    def size_xy(self) -> tuple[float, float]:
        return self.size0, self.size0 if self.size0_y is None else self.size0_y


def tile_layout(bag: Bag, slide: Slide, source: str | os.PathLike = "bag") -> TileLayout:
    """The level-0 tile positions and size of ``bag`` on ``slide``; refuse a bag that does not fit it."""
    if bag.coords is None:
        raise PathmilError(
            f"{source} has no tile coordinates (a CLAM .pt file?); heatmaps need the .h5 bag with coords"
        )
    coords = np.asarray(bag.coords, dtype=np.float64).reshape(-1, 2)
    attrs = {**bag.attrs, **bag.coords_attrs}
    size0, size0_y, inferred = None, None, False
    if bag.coords_unit == "um":
        coords = coords / np.array(slide.mpp_xy)
        if attrs.get("tile_size_um"):
            size0, size0_y = (float(attrs["tile_size_um"]) / m for m in slide.mpp_xy)
    elif attrs.get("patch_size_level0_xy") is not None:
        size0, size0_y = (float(v) for v in attrs["patch_size_level0_xy"])
    elif attrs.get("patch_size_level0"):
        size0 = float(attrs["patch_size_level0"])
    elif attrs.get("patch_size") and attrs.get("patch_level") is not None:
        level = int(attrs["patch_level"])
        if level < len(slide.level_downsamples):
            size0 = float(attrs["patch_size"]) * slide.level_downsamples[level]
    if bag.coords_origin == "centre" and attrs.get("tile_um"):  # slideflow: centres, tile size in um
        # slideflow reads square level-0 windows of tile_um / mpp-x px (it reads openslide's mpp-x only)
        size0, size0_y = float(attrs["tile_um"]) / slide.mpp_x, None
    if size0 is None:
        (size0, size0_y), inferred = grid_steps(coords, source), True
        log.warning(
            "%s names no tile size: using the coordinate spacing, %.1f x %.1f level-0 px", source, size0, size0_y
        )
    if bag.coords_origin == "centre":
        coords = coords - np.array([size0, size0 if size0_y is None else size0_y]) / 2
    width, height = slide.dimensions
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= width) | (coords[:, 1] >= height)
    if outside.any():
        x, y = coords[outside.argmax()]
        raise PathmilError(
            f"{outside.sum()} tile(s) of {source} lie outside slide {slide.slide_id} ({width} x {height} px, "
            f"first at {x:.0f}, {y:.0f}); is it this slide's bag"
            + (", and is its um/px right (--mpp)?" if bag.coords_unit == "um" else "?")
        )
    if size0_y is not None and math.isclose(size0_y, size0):
        size0_y = None
    return TileLayout(coords=coords, size0=float(size0), size_inferred=inferred, size0_y=size0_y)


def bag_mismatches(bag: Bag, slide: Slide) -> list[str]:
    """How ``bag`` disagrees with ``slide``: its slide id, level-0 size, slide fingerprint (what it records
    of them; a CLAM bag records none)."""
    problems = []
    bag_id = bag.attrs.get("slide_id")
    if bag_id is not None and str(bag_id) != slide.slide_id:
        problems.append(
            f"it was made for slide {bag_id}, not {slide.slide_id} (--slide-id gives the id of a slide file "
            "named otherwise)"
        )
    size = bag.attrs.get("level0_size")
    if size is None and bag.coords_attrs.get("level0_width") is not None:
        size = (bag.coords_attrs["level0_width"], bag.coords_attrs.get("level0_height"))
    if size is not None and tuple(int(v) for v in size) != tuple(slide.dimensions):
        problems.append(
            f"its slide was {int(size[0])} x {int(size[1])} px, {slide.path.name} is "
            f"{slide.dimensions[0]} x {slide.dimensions[1]}"
        )
    if slide.is_other_file_than(bag.attrs.get("slide_quickhash")):
        problems.append(f"its slide fingerprint (openslide.quickhash-1) differs from {slide.path.name}'s")
    return problems


def check_bag_matches_slide(bag: Bag, slide: Slide, source: str | os.PathLike, force: bool) -> list[str]:
    """Refuse a bag made for another slide (one line), or with ``force`` return the warnings.

    Raises:
        PathmilError: the bag's slide id, level-0 size or slide fingerprint disagree with ``slide``.
    """
    problems = bag_mismatches(bag, slide)
    if problems and not force:
        raise PathmilError(
            f"{source} is not the bag of {slide.path}: {'; '.join(problems)}; give this slide's bag, or "
            "--force to paint it anyway"
        )
    for problem in problems:
        log.warning("%s painted on %s although %s (--force)", source, slide.path, problem)
    return problems


def grid_steps(coords: np.ndarray, source: str | os.PathLike = "bag") -> tuple[float, float]:
    """The smallest spacing between distinct tile positions along x and along y: a grid's tile width and
    height in level-0 px (they differ where pixels are not square); an axis with one position takes the
    other's."""
    steps = []
    for axis in (0, 1):
        diffs = np.diff(np.unique(coords[:, axis]))
        steps.append(float(diffs[diffs > 0].min()) if (diffs > 0).any() else None)
    if steps == [None, None]:
        raise PathmilError(
            f"{source} names no tile size (patch_size_level0) and has a single tile position; "
            "add the attribute to its coords"
        )
    return steps[0] or steps[1], steps[1] or steps[0]


# ------------------------------------------------------------------------------------------- painting


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Percentiles in [0, 1]: 0 for the lowest score, 1 for the highest, ties share their mean rank."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < 2:
        return np.full(len(scores), 0.5)
    return (stats.rankdata(scores, method="average") - 1) / (len(scores) - 1)


def tile_rectangles(
    layout: TileLayout, level0_size: tuple[int, int], shape: tuple[int, int]
) -> tuple[np.ndarray, ...]:
    """Pixel rectangles [r0, r1) x [c0, c1) of the tiles in a picture of ``shape`` (h, w) of the slide.

    Edges are rounded, so neighbouring tiles meet without gaps or overlap; every tile keeps at least one
    pixel, and tiles crossing the slide's edge are clipped to it.
    """
    height, width = shape
    sx, sy = width / level0_size[0], height / level0_size[1]
    x, y = layout.coords[:, 0], layout.coords[:, 1]
    size_x, size_y = layout.size_xy
    c0 = np.clip(np.rint(x * sx), 0, width - 1).astype(np.int64)
    r0 = np.clip(np.rint(y * sy), 0, height - 1).astype(np.int64)
    c1 = np.clip(np.maximum(np.rint((x + size_x) * sx), c0 + 1), 0, width).astype(np.int64)
    r1 = np.clip(np.maximum(np.rint((y + size_y) * sy), r0 + 1), 0, height).astype(np.int64)
    return r0, r1, c0, c1


def paint(
    values: np.ndarray, layout: TileLayout, level0_size: tuple[int, int], shape: tuple[int, int]
) -> np.ndarray:
    """A (h, w) float32 map of the tiles' ``values``, averaged where tiles overlap, NaN off the tiles."""
    height, width = shape
    r0, r1, c0, c1 = tile_rectangles(layout, level0_size, shape)
    stride = width + 1
    plus = np.concatenate([r0 * stride + c0, r1 * stride + c1])  # corners that add the tile's value
    minus = np.concatenate([r0 * stride + c1, r1 * stride + c0])  # corners that subtract it
    values = np.asarray(values, dtype=np.float64)
    size = (height + 1) * stride

    def spread(table: np.ndarray) -> np.ndarray:
        return table.reshape(height + 1, stride).cumsum(axis=0).cumsum(axis=1)[:height, :width]

    both = np.concatenate([values, values])
    total = spread(np.bincount(plus, both, size) - np.bincount(minus, both, size))
    count = spread(np.bincount(plus, minlength=size) - np.bincount(minus, minlength=size))  # exact integers
    out = np.full(shape, np.nan, dtype=np.float32)
    np.divide(total, count, out=out, where=count > 0, casting="unsafe")
    return out


def smooth(values: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing of a painted map inside the tissue: a normalised convolution, so the empty
    surroundings (NaN) neither darken the tissue's edge nor get painted.

    A wide kernel is applied to a copy shrunk until sigma is :data:`SMOOTH_SIGMA_PX` pixels, then enlarged
    back (bilinear): the same blur up to interpolation, at a cost that does not grow with sigma.
    """
    if sigma_px <= 0:
        return values
    covered = np.isfinite(values)
    planes = np.dstack([np.where(covered, values, 0), covered]).astype(np.float32)
    scale = min(1.0, SMOOTH_SIGMA_PX / sigma_px)
    if scale < 1.0:
        small = (max(1, round(values.shape[1] * scale)), max(1, round(values.shape[0] * scale)))
        planes = cv2.resize(planes, small, interpolation=cv2.INTER_AREA)
    planes = cv2.GaussianBlur(planes, (0, 0), sigma_px * scale)
    if scale < 1.0:
        planes = cv2.resize(planes, values.shape[::-1], interpolation=cv2.INTER_LINEAR)
    out = np.full(values.shape, np.nan, dtype=np.float32)
    np.divide(planes[..., 0], np.maximum(planes[..., 1], 1e-6), out=out, where=covered)
    return out


def colour_table(cmap: str) -> np.ndarray:
    """256 RGB colours (uint8) of a matplotlib colour map, indexed by round(255 * value)."""
    import matplotlib

    return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def blend(thumbnail: np.ndarray, values: np.ndarray, cmap: str, alpha: float) -> np.ndarray:
    """The thumbnail with the colours of ``values`` (in [0, 1], NaN: none) blended over it."""
    covered = np.isfinite(values)
    index = np.rint(np.clip(np.nan_to_num(values), 0, 1) * 255).astype(np.uint8)
    mixed = cv2.addWeighted(colour_table(cmap)[index], alpha, thumbnail, 1 - alpha, 0)
    return np.where(covered[..., None], mixed, thumbnail)


def render(
    scores: np.ndarray,
    layout: TileLayout,
    thumbnail: np.ndarray,
    level0_size: tuple[int, int],
    config: HeatmapConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """(percentile map, blended overlay) of instance ``scores`` over ``thumbnail`` of the slide."""
    shape = thumbnail.shape[:2]
    values = paint(rank_normalise(scores), layout, level0_size, shape)
    sigma_px = config.smooth * layout.size0 * shape[1] / level0_size[0]
    values = smooth(values, sigma_px)
    return values, blend(thumbnail, values, config.cmap, config.alpha)


# ------------------------------------------------------------------------------------------ the slide


def thumbnail_level(slide: Slide, downsample: float) -> int:
    """The coarsest level at least as fine as ``downsample``, unless it is too big to read whole; then
    the finest level that is not (the thumbnail is then enlarged from it)."""
    sizes = [w * h for w, h in slide.level_dimensions]
    fine = [i for i, d in enumerate(slide.level_downsamples) if d <= downsample * 1.01]
    level = max(fine, key=lambda i: slide.level_downsamples[i]) if fine else 0
    if sizes[level] > MAX_READ_PX:
        small = [i for i, s in enumerate(sizes) if s <= MAX_READ_PX]
        level = min(small, key=lambda i: slide.level_downsamples[i]) if small else len(sizes) - 1
    return level


def read_thumbnail(slide: Slide, max_px: int) -> np.ndarray:
    """The whole slide as RGB, its longer side ``max_px`` (or the slide's size if smaller)."""
    width, height = slide.dimensions
    scale = min(1.0, max_px / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = slide.read_level(thumbnail_level(slide, 1 / scale))
    if image.shape[1] == size[0] and image.shape[0] == size[1]:
        return image
    shrinking = image.shape[1] > size[0]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


@dataclass
class MontageTile:
    index: int  # row of the bag
    score: float
    percentile: float
    x: int
    y: int
    image: np.ndarray  # px x px x 3


def montage_tiles(
    slide: Slide, layout: TileLayout, scores: np.ndarray, k: int, px: int
) -> tuple[list[MontageTile], list[MontageTile]]:
    """The ``k`` tiles with the highest and the ``k`` with the lowest scores, read at ``px`` pixels from
    the coarsest pyramid level still as fine as that (ties keep bag order); white beyond the slide's edge."""
    k = min(k, len(scores))
    percentiles = rank_normalise(scores)
    order = np.argsort(-np.asarray(scores), kind="stable")
    downsample = min(layout.size_xy) / px
    fine = [i for i, d in enumerate(slide.level_downsamples) if d <= downsample * 1.01]
    level = max(fine, key=lambda i: slide.level_downsamples[i]) if fine else 0
    read_w, read_h = (max(1, round(s / slide.level_downsamples[level])) for s in layout.size_xy)

    def tile(i: int) -> MontageTile:
        x, y = (round(float(v)) for v in layout.coords[i])
        image = resize(slide.read_region(x, y, level, read_w, read_h), px)
        return MontageTile(int(i), float(scores[i]), float(percentiles[i]), x, y, image)

    top = [tile(i) for i in order[:k]]
    bottom = [tile(i) for i in np.argsort(np.asarray(scores), kind="stable")[:k]]
    return top, bottom


# ---------------------------------------------------------------------------------------- the pictures


def _figure_rgb(fig: Any, height: int, width: int) -> np.ndarray:
    """The pixels of a matplotlib figure drawn by Agg, as RGB of exactly ``height`` x ``width`` (the
    figure's own size can differ by a pixel from float rounding of inches x dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[:height, :width, :3]
    out = np.full((height, width, 3), 255, np.uint8)
    out[: rgb.shape[0], : rgb.shape[1]] = rgb
    return out


@dataclass(frozen=True)
class PictureLayout:
    """Where the parts of the heatmap picture lie, in pixels, for a thumbnail of ``height`` x ``width``.

    Text and colour bar grow with the picture (a 2,048 px thumbnail would dwarf 11 pt labels): they are
    drawn at ``scale`` x 100 dpi, ``scale`` being the panel height over 512 px (at least 1).
    """

    height: int
    width: int

    @property
    def rows(self) -> int:
        return max(self.height, MIN_HEIGHT_PX)

    @property
    def scale(self) -> float:
        return max(1.0, self.rows / 512)

    @property
    def title_px(self) -> int:
        return round(TITLE_PX * self.scale)

    @property
    def bar_px(self) -> int:
        return round(BAR_PX * self.scale)

    @property
    def overlay_origin(self) -> tuple[int, int]:
        """(row, col) of the overlay panel's top-left pixel (the thumbnail panel starts at (row, 0))."""
        return self.title_px, self.width + GAP_PX

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the whole picture."""
        return self.title_px + self.rows, 2 * self.width + 2 * GAP_PX + self.bar_px


def colour_bar(layout: PictureLayout, cmap: str) -> np.ndarray:
    """The colour bar panel, labelled in percentiles."""
    import matplotlib
    from matplotlib.figure import Figure

    dpi = 100 * layout.scale
    fig = Figure(figsize=(layout.bar_px / dpi, layout.rows / dpi), dpi=dpi)
    axes = fig.add_axes((0.12, 0.04, 0.2, 0.92))
    mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 100), matplotlib.colormaps[cmap])
    fig.colorbar(mappable, cax=axes, label="instance score percentile")
    return _figure_rgb(fig, layout.rows, layout.bar_px)


def title_band(layout: PictureLayout, text: str) -> np.ndarray:
    from matplotlib.figure import Figure

    dpi = 100 * layout.scale
    width = layout.size[1]
    fig = Figure(figsize=(width / dpi, layout.title_px / dpi), dpi=dpi)
    fig.text(0.005, 0.5, text, va="center", ha="left", fontsize=11)
    return _figure_rgb(fig, layout.title_px, width)


def compose(thumbnail: np.ndarray, overlay: np.ndarray, cmap: str, title: str) -> np.ndarray:
    """The heatmap picture: a title band over [thumbnail | overlay | colour bar].

    Panels are placed unscaled, so a pixel (col, row) of the overlay panel maps to level-0 pixel
    (col, row) x the thumbnail's downsample; :class:`PictureLayout` says where the panel starts.
    """
    layout = PictureLayout(*thumbnail.shape[:2])
    top, left = layout.overlay_origin
    canvas = np.full((*layout.size, 3), 255, np.uint8)
    canvas[top : top + layout.height, : layout.width] = thumbnail
    canvas[top : top + layout.height, left : left + layout.width] = overlay
    canvas[top:, -layout.bar_px :] = colour_bar(layout, cmap)
    canvas[:top] = title_band(layout, title)
    return canvas


def save_montage(
    path: str | os.PathLike,
    top: list[MontageTile],
    bottom: list[MontageTile],
    title: str,
    jpeg_quality: int = 85,
) -> None:
    """Two rows of tiles, highest scores above, lowest below, each titled with its score and percentile;
    JPEG for a .jpg path, else PNG."""
    from matplotlib.figure import Figure

    k = max(len(top), 1)
    fig = Figure(figsize=(1.7 * k + 0.6, 4.3), dpi=100)
    axes = fig.subplots(2, k, squeeze=False)
    for row, tiles, label in ((0, top, "highest scores"), (1, bottom, "lowest scores")):
        axes[row, 0].set_ylabel(label)
        for col in range(k):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(tiles):
                tile = tiles[col]
                ax.imshow(tile.image)
                ax.set_title(
                    f"{tile.score:.3g} (p{100 * tile.percentile:.0f})\n({tile.x}, {tile.y})", fontsize=7
                )
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.02, top=0.82, wspace=0.08, hspace=0.45)
    jpeg = str(path).lower().endswith((".jpg", ".jpeg"))
    with atomic_output(path) as tmp:
        fig.savefig(
            tmp, format="jpeg" if jpeg else "png", pil_kwargs={"quality": jpeg_quality} if jpeg else None
        )


# ------------------------------------------------------------------------------------------ the stage


@dataclass
class Heatmap:
    """Everything a heatmap is made of, for callers that want more than the PNG."""

    slide_id: str
    scores: np.ndarray  # instance scores, in bag order
    layout: TileLayout
    thumbnail: np.ndarray
    values: np.ndarray  # the painted (and smoothed) percentiles, NaN off the tiles
    overlay: np.ndarray
    score: float  # the model's score of this slide's bag alone
    level0_size: tuple[int, int]


def instance_scores(
    loaded: TrainedRun, bag: Bag, source: str | os.PathLike = "bag"
) -> tuple[np.ndarray, float]:
    """(instance scores, slide score) of one bag under a trained run (:func:`pathmil.training.run.load_run`).

    The bag is scored as training and prediction score it (:meth:`TrainedRun.score`), so the slide score is
    the one ``pathmil predict`` gives this bag.
    """
    output = loaded.score(model_input(bag.features))
    scores = output.instance_scores.float().cpu().numpy().reshape(-1)
    if len(scores) != bag.n_instances:
        raise PathmilError(
            f"aggregator {loaded.aggregator} gave {len(scores)} instance scores for the {bag.n_instances} "
            f"tiles of {source}; its instance_scores must have one value per tile"
        )
    if not np.isfinite(scores).all():
        raise PathmilError(
            f"model {loaded.path} gives non-finite instance scores on {source}; is it diverged?"
        )
    score = float(loaded.task.predict(output.logits.float().cpu())["score"][0])
    return scores, score


def make_heatmap(
    checkpoint: str | os.PathLike | TrainedRun | list[TrainedRun],
    features: str | os.PathLike,
    slide_path: str | os.PathLike,
    out: str | os.PathLike,
    montage: str | os.PathLike | None = None,
    scores_csv: str | os.PathLike | None = None,
    config: HeatmapConfig | None = None,
    mpp: float | None = None,
    expected_task: str | None = None,
    slide_id: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Score one slide's bag, write the heatmap (JPEG for a .jpg path, else PNG; the montage likewise, and
    the per-tile scores, if asked).

    ``checkpoint``: a checkpoint file, or models already loaded; several (a package's fold models) paint
    the mean of their instance-score percentiles, and the slide score is the mean of theirs.

    ``slide_id`` names the slide file (default: its file name); a bag made for another slide is refused
    unless ``force`` (:func:`check_bag_matches_slide`). Returns facts: slide id, tiles, the slide score,
    seconds per step, warnings.

    Raises:
        PathmilError: the bag does not fit the model or the slide.
    """
    config = config or HeatmapConfig()
    seconds: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    if isinstance(checkpoint, list):
        models = checkpoint
    elif isinstance(checkpoint, TrainedRun):
        models = [checkpoint]
    else:
        models = [load_run(checkpoint, config.device, expected_task)]
    loaded = models[0]
    bag = read_bag(features)
    for model in models:
        check_bag(model, features, bag.dim, bag.attrs)
    lap("load")
    with Slide(slide_path, slide_id=slide_id, mpp=mpp) as slide:
        warnings = check_bag_matches_slide(bag, slide, features, force)
        layout = tile_layout(bag, slide, features)
        scored = [instance_scores(model, bag, features) for model in models]
        if len(scored) == 1:
            scores, score = scored[0]
        else:
            scores = np.mean([rank_normalise(s) for s, _ in scored], axis=0)
            score = float(np.mean([value for _, value in scored]))
        lap("model")
        thumbnail = read_thumbnail(slide, config.max_px)
        lap("thumbnail")
        values, overlay = render(scores, layout, thumbnail, slide.dimensions, config)
        heatmap = Heatmap(slide.slide_id, scores, layout, thumbnail, values, overlay, score, slide.dimensions)
        lap("paint")
        title = (
            f"{slide.slide_id}: {loaded.aggregator} {loaded.task.name} "
            + ("model" if len(models) == 1 else f"ensemble of {len(models)}")
            + f", slide score {score:.3g}; "
            f"{len(scores)} tiles coloured by instance-score percentile"
            + (f", smoothed (sigma {config.smooth:g} tile)" if config.smooth > 0 else "")
        )
        picture = compose(thumbnail, overlay, config.cmap, title)
        with atomic_output(out) as tmp:
            write_picture(str(tmp), picture, config.jpeg_quality)
        lap("write")
        if montage is not None:
            top, bottom = montage_tiles(slide, layout, scores, config.top_k, config.montage_px)
            title = f"{slide.slide_id}: {loaded.aggregator} instance scores"
            save_montage(montage, top, bottom, title, config.jpeg_quality)
            lap("montage")
    if scores_csv is not None:
        table = pd.DataFrame(
            {
                "x": layout.coords[:, 0].round().astype(np.int64),
                "y": layout.coords[:, 1].round().astype(np.int64),
                "score": scores,
                "percentile": rank_normalise(scores),
            }
        )
        with atomic_output(scores_csv) as tmp:
            table.to_csv(tmp, index=False)
    return {
        "slide_id": heatmap.slide_id,
        "n_tiles": len(scores),
        "score": score,
        "tile_size_level0": layout.size0,
        "tile_size_inferred": layout.size_inferred,
        "downsample": heatmap.level0_size[0] / thumbnail.shape[1],
        "warnings": warnings,
        "seconds": round(time.perf_counter() - start, 3),
        "steps": seconds,
        "heatmap": heatmap,
    }


def held_out_model(models: list[Path], splits: Path | None, features: Path) -> Path:
    """The checkpoint, among the folds' ``best.pt``, of the fold whose test split holds this slide.

    A heatmap of a slide the model trained on shows what it memorised; the fold that held the slide out
    shows what it learnt. The slide id is the bag file's, and each run's fold comes from the
    ``metrics.json`` beside its checkpoint.
    """
    import json

    if splits is None:
        raise PathmilError("several --model checkpoints need --splits to pick the fold that tested the slide")
    slide_id = str(read_bag_attrs(features).get("slide_id") or Path(features).stem)
    table = pd.read_csv(splits, dtype={"slide_id": str})
    test = table[(table["slide_id"] == slide_id) & (table["split"] == "test")]
    if test.empty:
        raise PathmilError(f"slide {slide_id} is in no test split of {splits}")
    folds = set(test["fold"].astype(int))
    for model in models:
        metrics = Path(model).parent / "metrics.json"
        if metrics.is_file() and int(json.loads(metrics.read_text())["fold"]) in folds:
            return Path(model)
    raise PathmilError(
        f"none of the given checkpoints is of fold {sorted(folds)}, which tested slide {slide_id}"
    )
