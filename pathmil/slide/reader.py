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

# The plausible level-0 resolutions of a slide, in um/px: for the slide's metadata, the cohort table's
# `mpp` column (workflow/schemas/cohort.schema.yaml holds the same bounds, tests/test_slide.py checks),
# `--mpp` and `tile.default_mpp`. Outside it a value is a placeholder, not a measurement: generic TIFF
# writers put 72, 96 or 300 dpi (352.8, 264.6, 84.7 um/px) or 1 pixel/cm (10,000 um/px) into files that
# carry no resolution; a 2x objective gives about 5 um/px, so 20 leaves room for the coarsest real scans.
MPP_RANGE = (0.05, 20.0)
# Pick a level whose resolution is up to this much coarser than the target (float rounding of downsamples).
LEVEL_TOLERANCE = 0.01
# Where a slide's um/px came from (``Slide.mpp_source``, the facts' ``mpp_source``) and how messages name it
MPP_SOURCES = {
    "metadata": "the slide's metadata",
    "table": "the cohort table's 'mpp' column",
    "argument": "--mpp",
    "default": "tile.default_mpp",
    "tiles": "the tiles file",
}


@dataclass(frozen=True)
class TileGeometry:
    """Where and how big a tile is read: ``read_size`` (w, h) pixels at ``level``, covering ``size_level0``
    (w, h) level-0 pixels, which is ``tile_px * target_mpp`` um on both sides (non-square pixels read a
    non-square region, resized to a square tile)."""

    level: int
    read_size: tuple[int, int]
    size_level0: tuple[float, float]
    target_mpp: float
    tile_px: int

    @property
    def read_px(self) -> int:
        """Read width at ``level`` (CLAM's ``patch_size``; the height too when pixels are square)."""
        return self.read_size[0]

    @property
    def patch_size_level0(self) -> int:
        """Level-0 width (TRIDENT's ``patch_size_level0``; the height too when pixels are square)."""
        return round(self.size_level0[0])

    @property
    def size_um(self) -> float:
        return self.tile_px * self.target_mpp


def metadata_mpp(props: dict[str, str]) -> tuple[float, float] | None:
    """The level-0 (x, y) um/px that the slide's metadata states, unchecked (see :data:`MPP_RANGE`).

    OpenSlide normalises vendor fields into ``openslide.mpp-x``/``-y`` (Aperio, Hamamatsu, MIRAX, DICOM and
    the TIFF resolution tags); a slide that states one axis only has square pixels.
    """
    values = {}
    for axis in ("x", "y"):
        try:
            value = float(props[f"openslide.mpp-{axis}"])
        except (KeyError, ValueError):
            continue
        if math.isfinite(value):
            values[axis] = value
    if not values:
        return None
    return values.get("x", values.get("y")), values.get("y", values.get("x"))  # type: ignore[return-value]


def plausible_mpp(value: float) -> bool:
    return MPP_RANGE[0] <= value <= MPP_RANGE[1]


MPP_DISAGREEMENT = 0.1  # a given mpp further than 10 % from the metadata's is named where it is overruled


def _overruled(
    given: float | tuple[float, float] | None, source: str, meta: tuple[float, float]
) -> str | None:
    """The words for a table or --mpp value that the slide's metadata overrules and that disagrees with it
    by more than :data:`MPP_DISAGREEMENT` (a mis-tagged scan, or a wrong table); None otherwise. The
    configured default is a fallback by design and is not named."""
    if given is None or source == "default":
        return None
    pair = (float(given), float(given)) if np.isscalar(given) else tuple(map(float, given))
    if any(math.isnan(v) for v in pair):
        return None
    if all(abs(g - m) <= MPP_DISAGREEMENT * m for g, m in zip(pair, meta)):
        return None
    return (
        f"{MPP_SOURCES[source]} gives {mpp_text(pair)} but the slide's metadata states {mpp_text(meta)}; "  # type: ignore[arg-type]
        "the metadata's value is used (a given mpp applies only where the metadata has none): check the "
        "scan or the table"
    )


def mpp_text(mpp: tuple[float, float]) -> str:
    """'0.5 um/px', or '0.25 x 0.5 um/px' for non-square pixels."""
    x, y = mpp
    return f"{x:.6g} um/px" if x == y else f"{x:.6g} x {y:.6g} um/px"


class Slide:
    """An open slide, its level-0 um/px along x and y, and the source of those values.

    ``mpp`` is the fallback used when the metadata has no plausible value: pass the cohort table's ``mpp``
    with ``mpp_source="table"``, or ``--mpp`` / the configured default with ``"argument"`` / ``"default"``
    (the keys of :data:`MPP_SOURCES`); a pair is (x, y). ``mpp_note`` says why the metadata's value was not
    used, when it was not.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        slide_id: str | None = None,
        mpp: float | tuple[float, float] | None = None,
        mpp_source: str = "argument",
    ):
        import openslide  # lazy: keeps `pathmil --help` fast

        if mpp_source not in MPP_SOURCES:
            raise ValueError(f"mpp_source {mpp_source!r} is none of {list(MPP_SOURCES)}")

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
        self.mpp_note: str | None = None
        self.mpp_xy, self.mpp_source = self._resolve_mpp(mpp, mpp_source)

    @property
    def mpp_x(self) -> float:
        return self.mpp_xy[0]

    @property
    def mpp_y(self) -> float:
        return self.mpp_xy[1]

    @property
    def mpp(self) -> float:
        """One um/px for records and messages: the mean of x and y (geometry uses ``mpp_x``/``mpp_y``)."""
        return (self.mpp_x + self.mpp_y) / 2

    @property
    def quickhash(self) -> str | None:
        """OpenSlide's fingerprint of the slide (``openslide.quickhash-1``: properties and lowest level)."""
        return self.properties.get("openslide.quickhash-1")

    def is_other_file_than(self, recorded_quickhash: str | None) -> bool:
        """Whether a tiles file or bag that recorded ``recorded_quickhash`` was made from another file than
        this one (a re-scan, another slide of the same size); unknown where either side lacks it."""
        return bool(recorded_quickhash and self.quickhash and recorded_quickhash != self.quickhash)

    def _resolve_mpp(
        self, fallback: float | tuple[float, float] | None, fallback_source: str
    ) -> tuple[tuple[float, float], str]:
        meta = metadata_mpp(self.properties)
        if meta is not None and all(plausible_mpp(v) for v in meta):
            self.mpp_note = _overruled(fallback, fallback_source, meta)
            return meta, "metadata"
        how = "give it in the cohort table's 'mpp' column, with --mpp or as tile.default_mpp"
        if meta is not None:
            self.mpp_note = (
                f"its metadata states {mpp_text(meta)}, which is no plausible scan resolution "
                f"({MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} um/px; 10,000 is a TIFF written at 1 pixel/cm, "
                "352.8 one at 72 dpi)"
            )
        if fallback is not None and not (isinstance(fallback, float) and math.isnan(fallback)):
            pair = (
                (float(fallback), float(fallback)) if np.isscalar(fallback) else tuple(map(float, fallback))
            )
            if not all(plausible_mpp(v) for v in pair):
                raise SlideError(
                    self.slide_id,
                    f"mpp {mpp_text(pair)} from {MPP_SOURCES[fallback_source]} lies outside the plausible "  # type: ignore[arg-type]
                    f"{MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} um/px; fix the value (um per pixel, not pixels per um)",
                )
            return pair, fallback_source  # type: ignore[return-value]
        if self.mpp_note is not None:
            raise SlideError(self.slide_id, f"{self.mpp_note}; {how}")
        hint = ""
        power = self.properties.get("openslide.objective-power")
        if power:
            hint = (
                f" (its objective power is {power}x; 10/{power} = {10 / float(power):.3g} um/px is typical)"
            )
        raise SlideError(self.slide_id, f"no microns-per-pixel in its metadata{hint}; {how}")

    # -------------------------------------------------------------------------------- geometry

    @property
    def magnification(self) -> float | None:
        """Objective power at level 0, when the metadata states it."""
        try:
            return float(self.properties["openslide.objective-power"])
        except (KeyError, ValueError):
            return None

    def level_mpp(self, level: int) -> float:
        """The coarser of the two axes' um/px at ``level``."""
        return max(self.mpp_xy) * self.level_downsamples[level]

    def level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level that is still at least as fine as ``target_mpp`` along both axes (level 0 if
        none is)."""
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
        """The level and the read size that give square tiles of ``tile_px`` pixels at ``target_mpp`` um/px:
        ``tile_px * target_mpp`` um on each side, whatever the pixels' aspect."""
        size_um = tile_px * target_mpp
        size0 = (size_um / self.mpp_x, size_um / self.mpp_y)
        level = self.level_for_mpp(target_mpp)
        downsample = self.level_downsamples[level]
        read_size = (max(1, round(size0[0] / downsample)), max(1, round(size0[1] / downsample)))
        return TileGeometry(
            level=level, read_size=read_size, size_level0=size0, target_mpp=target_mpp, tile_px=tile_px
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
        """One tile at level-0 position (x, y), resized to ``tile_px`` x ``tile_px``; where it crosses the
        slide's right or bottom edge, the part beyond is white (:func:`rgba_to_rgb`)."""
        tile = self.read_region(x, y, geometry.level, *geometry.read_size)
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
    """Composite OpenSlide's RGBA on white: empty areas of sparse scans, and everything beyond the slide's
    edge, read as transparent black. White is what glass looks like; CLAM's extractor drops the alpha
    channel instead, so its tiles crossing the edge are padded with black."""
    import cv2

    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        # OpenCV drops the alpha channel 20-50x faster than numpy copies a strided view.
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` (a non-square read of non-square pixels becomes square), with area
    averaging when shrinking (no aliasing) and bilinear when growing."""
    import cv2

    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = image.shape[0] * image.shape[1] > size * size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
