"""Open a whole-slide image with OpenSlide and work in physical units (um per pixel).

Users think in microns per pixel, not in pyramid levels, and levels differ between scanners. A
:class:`Slide` knows its level-0 resolution and where it came from (metadata, the cohort table, an argument
or a configured default), picks the level to read for a target resolution, and reads tiles resized to a
fixed pixel size. Every failure is a :class:`~pathmil.errors.SlideError` naming the slide and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pathmil.errors import SlideError
from pathmil.ids import SLIDE_EXTENSIONS, slide_id_from_path  # noqa: F401 (re-exported)

# A level-0 resolution outside this range is a placeholder, not a measurement: generic TIFF writers put
# 72 dpi (352.8 um/px) into files that carry no resolution at all.
PLAUSIBLE_MPP = (0.05, 20.0)
# Pick a level whose resolution is up to this much coarser than the target (float rounding of downsamples).
LEVEL_TOLERANCE = 0.01


@dataclass(frozen=True)
class TileGeometry:
    """Where and how big a tile is read: ``read_px`` at ``level``, covering ``size_level0`` level-0 pixels."""

    level: int
    read_px: int
    size_level0: float
    target_mpp: float
    tile_px: int

    @property
    def patch_size_level0(self) -> int:
        return round(self.size_level0)


def mpp_from_properties(props: dict[str, str]) -> float | None:
    """The level-0 um/px that the slide's own metadata states, if it is plausible.

    OpenSlide normalises vendor fields into ``openslide.mpp-x``/``-y`` (Aperio, Hamamatsu, MIRAX, DICOM and
    TIFF resolution tags); anisotropic pixels use the mean of both axes.
    """
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            values.append(float(props[key]))
        except (KeyError, ValueError):
            pass
    if not values:
        return None
    mpp = float(np.mean(values))
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


class Slide:
    """An open slide, its level-0 um/px and the source of that value.

    ``mpp`` is the fallback used when the metadata has no plausible value: pass the cohort table's ``mpp``
    with ``mpp_source="table"``, or ``--mpp`` / the configured default with ``"argument"`` / ``"default"``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        slide_id: str | None = None,
        mpp: float | None = None,
        mpp_source: str = "argument",
    ):
        import openslide  # lazy: keeps `pathmil --help` fast

        self.path = Path(path)
        self.slide_id = slide_id or slide_id_from_path(self.path)
        if not self.path.exists():
            raise SlideError(
                self.slide_id, f"file {self.path} does not exist; check the path or the cohort table"
            )
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise SlideError(self.slide_id, f"file {self.path} is empty; copy the slide again")
        try:
            self.handle = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(
                self.slide_id,
                f"OpenSlide does not recognise {self.path.name} as a slide "
                "(unsupported format, or a truncated file); convert it to pyramidal TIFF or re-copy it",
            ) from None
        except openslide.OpenSlideError as err:
            raise SlideError(
                self.slide_id,
                f"OpenSlide cannot open {self.path.name}: {err}; "
                "the file is damaged or uses an unsupported encoding",
            ) from None
        self.properties = dict(self.handle.properties)
        self.dimensions: tuple[int, int] = self.handle.dimensions
        self.level_dimensions: tuple[tuple[int, int], ...] = self.handle.level_dimensions
        self.level_downsamples: tuple[float, ...] = self.handle.level_downsamples
        self.mpp, self.mpp_source = self._resolve_mpp(mpp, mpp_source)

    def _resolve_mpp(self, fallback: float | None, fallback_source: str) -> tuple[float, str]:
        meta = mpp_from_properties(self.properties)
        if meta is not None:
            return meta, "metadata"
        if fallback is not None and not (isinstance(fallback, float) and math.isnan(fallback)):
            if not fallback > 0:
                raise SlideError(self.slide_id, f"mpp {fallback} is not a positive number; fix the mpp value")
            return float(fallback), fallback_source
        hint = ""
        power = self.properties.get("openslide.objective-power")
        if power:
            hint = (
                f" (its objective power is {power}x; 10/{power} = {10 / float(power):.3g} um/px is typical)"
            )
        raise SlideError(
            self.slide_id,
            "no microns-per-pixel in its metadata"
            + hint
            + "; give it in the cohort table's 'mpp' column or with --mpp",
        )

    # -------------------------------------------------------------------------------- geometry

    @property
    def magnification(self) -> float | None:
        """Objective power at level 0, when the metadata states it."""
        try:
            return float(self.properties["openslide.objective-power"])
        except (KeyError, ValueError):
            return None

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level that is still at least as fine as ``target_mpp`` (level 0 if none is)."""
        fine_enough = [
            lvl
            for lvl in range(len(self.level_downsamples))
            if self.level_mpp(lvl) <= target_mpp * (1 + LEVEL_TOLERANCE)
        ]
        return max(fine_enough, key=lambda lvl: self.level_downsamples[lvl]) if fine_enough else 0

    def level_for_downsample(self, downsample: float) -> int:
        """The level whose downsample is closest to ``downsample`` (in log scale), as for segmentation."""
        return int(np.argmin([abs(math.log(d / downsample)) for d in self.level_downsamples]))

    def tile_geometry(self, target_mpp: float, tile_px: int) -> TileGeometry:
        """The level and the read size that give tiles of ``tile_px`` pixels at ``target_mpp`` um/px."""
        size0 = tile_px * target_mpp / self.mpp
        level = self.level_for_mpp(target_mpp)
        read_px = max(1, round(size0 / self.level_downsamples[level]))
        return TileGeometry(
            level=level, read_px=read_px, size_level0=size0, target_mpp=target_mpp, tile_px=tile_px
        )

    # ------------------------------------------------------------------------------------ pixels

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB pixels (H x W x 3, uint8) at ``level``; transparent areas (outside the scan) become white."""
        import openslide

        try:
            rgba = np.asarray(self.handle.read_region((int(x), int(y)), level, (int(width), int(height))))
        except openslide.OpenSlideError as err:
            raise SlideError(
                self.slide_id, f"cannot read region ({x}, {y}) at level {level}: {err}"
            ) from None
        return rgba_to_rgb(rgba)

    def read_tile(self, x: int, y: int, geometry: TileGeometry) -> np.ndarray:
        """One tile at level-0 position (x, y), resized to ``tile_px`` x ``tile_px``."""
        tile = self.read_region(x, y, geometry.level, geometry.read_px, geometry.read_px)
        return resize(tile, geometry.tile_px)

    def read_level(self, level: int) -> np.ndarray:
        """A whole pyramid level as RGB."""
        width, height = self.level_dimensions[level]
        return self.read_region(0, 0, level, width, height)

    def read_thumbnail(self, downsample: float, max_direct_px: int = 8192) -> tuple[np.ndarray, float]:
        """The slide at about ``downsample`` (relative to level 0), and the downsample actually obtained.

        The closest pyramid level is read whole when it is small enough. A slide without a level near the
        wanted downsample (a single-level 40,000 px TIFF) is read in strips, each shrunk by area averaging
        as it comes, so memory stays at a strip and the picture matches what a pyramid would give.
        """
        level = self.level_for_downsample(downsample)
        width, height = self.level_dimensions[level]
        factor = int(downsample / self.level_downsamples[level])
        if factor < 2 or max(width, height) <= max_direct_px:
            return self.read_level(level), self.dimensions[0] / width
        out_w, out_h = width // factor, height // factor
        rows_per_strip = max(1, 4096 // factor) * factor  # level pixels, a multiple of the factor
        level_ds = self.level_downsamples[level]
        strips = []
        for top in range(0, out_h * factor, rows_per_strip):
            rows = min(rows_per_strip, out_h * factor - top)
            strip = self.read_region(0, round(top * level_ds), level, out_w * factor, rows)
            strips.append(cv2.resize(strip, (out_w, rows // factor), interpolation=cv2.INTER_AREA))
        return np.concatenate(strips), self.dimensions[0] / out_w

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA on white: empty areas of sparse scans read as transparent black."""
    import cv2

    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        # OpenCV drops the alpha channel 20-50x faster than numpy copies a strided view.
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize with area averaging when shrinking (no aliasing) and bilinear when growing."""
    import cv2

    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = image.shape[0] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
