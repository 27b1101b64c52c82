"""Tissue segmentation on a low-resolution level: CLAM's recipe with its parameter names.

Saturation separates stained tissue from the white glass: RGB -> HSV, saturation channel, median blur,
fixed or Otsu threshold, morphological closing, then contours with holes (a two-level hierarchy) filtered by
area (Lu et al., "Data-efficient and weakly supervised computational pathology on whole-slide images",
Nat. Biomed. Eng. 2021). Areas are measured in reference patches of 512 x 512 level-0 pixels so a preset
means the same on every scanner. On top of CLAM, ``remove_artifacts`` drops pen ink and black borders,
which have high saturation too and would otherwise be tiled as tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import Field

from pathmil.settings import Settings

REFERENCE_PATCH_LEVEL0 = 512


class TissueConfig(Settings):
    """Tissue segmentation parameters, with CLAM's names (Lu et al., Nat. Biomed. Eng. 2021).

    Areas ``a_t`` and ``a_h`` count reference patches of 512 x 512 level-0 pixels, as CLAM does.
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
        16, ge=0, description="minimum tissue area (minus holes) of a kept piece, in reference patches"
    )
    a_h: float = Field(4, ge=0, description="minimum area of a kept hole, in reference patches")
    max_n_holes: int = Field(8, ge=0, description="keep at most this many (largest) holes per tissue piece")
    seg_downsample: float = Field(
        64, gt=0, description="segment at the pyramid level closest to this downsample"
    )
    remove_artifacts: bool = Field(
        False, description="drop pen marks (blue, green, black ink) and black borders"
    )


# CLAM's presets, under CLAM's names, for users who carry their settings over.
TISSUE_PRESETS: dict[str, TissueConfig] = {
    "tcga": TissueConfig(sthresh=8, mthresh=7, close=4, a_t=16, a_h=4, max_n_holes=8),
    "bwh_biopsy": TissueConfig(sthresh=15, mthresh=11, close=2, a_t=1, a_h=1, max_n_holes=2),
    "bwh_resection": TissueConfig(sthresh=15, mthresh=11, close=4, a_t=100, a_h=16, max_n_holes=8),
}


@dataclass
class TissueMask:
    """The tissue of a slide at the segmentation level.

    ``mask`` is 1 on kept tissue (holes excluded); ``contours`` and ``holes`` are in segmentation-level
    pixels, ``holes[i]`` belonging to ``contours[i]``; ``downsample`` maps them to level 0.
    """

    mask: np.ndarray
    contours: list[np.ndarray]
    holes: list[list[np.ndarray]]
    downsample: float

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


def segment_tissue(rgb: np.ndarray, downsample: float, params: TissueConfig) -> TissueMask:
    """Segment tissue in an RGB image taken at ``downsample`` relative to level 0."""
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
    contours, holes = _filter_contours(binary, downsample, params)
    mask = np.zeros(binary.shape, np.uint8)
    cv2.drawContours(mask, contours, -1, 1, thickness=cv2.FILLED)
    for contour_holes in holes:
        cv2.drawContours(mask, contour_holes, -1, 0, thickness=cv2.FILLED)
    return TissueMask(mask=mask, contours=contours, holes=holes, downsample=downsample)


def _filter_contours(
    binary: np.ndarray, downsample: float, params: TissueConfig
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Keep tissue contours larger than ``a_t`` (net of holes) and their largest holes above ``a_h``."""
    found, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return [], []
    hierarchy = hierarchy[0]  # rows: next, previous, first child, parent
    ref_area = (REFERENCE_PATCH_LEVEL0 / downsample) ** 2
    min_tissue, min_hole = params.a_t * ref_area, params.a_h * ref_area
    contours, holes = [], []
    for idx in np.flatnonzero(hierarchy[:, 3] == -1):  # outer boundaries
        children = np.flatnonzero(hierarchy[:, 3] == idx)
        child_areas = [cv2.contourArea(found[c]) for c in children]
        net_area = cv2.contourArea(found[idx]) - sum(child_areas)
        if net_area <= 0 or net_area < min_tissue:
            continue
        big_holes = sorted((a, c) for a, c in zip(child_areas, children) if a > min_hole)
        kept = [found[c] for _, c in big_holes[::-1][: params.max_n_holes]]
        contours.append(found[idx])
        holes.append(kept)
    return contours, holes
