"""The embedded demo cohort: synthetic H&E-like slides whose labels are visible in the tissue.

Every stage of pathmil runs on this cohort in minutes on two CPU cores, so it must be small, yet training
must have something real to learn. Each patient has three hidden properties that are painted into the
tissue and drive the labels:

- ``label`` (0/1, the classification target): the grade of the tumour regions. Grade 1 (label 1) paints
  large, irregular, dark nuclei; grade 0 small regular ones. The tumour share of the tissue varies on its
  own, so the label is about what the tumour tiles look like, a multiple-instance problem.
- ``stil`` (0-100 %, the regression target): stromal tumour-infiltrating lymphocytes, painted as small
  round dark nuclei scattered in the pink stroma with a density proportional to ``stil``.
- ``time``/``event`` (survival, months): drawn from a log-normal model whose risk rises with grade and
  falls with sTIL, as in breast cancer, with random censoring.

Slides are pyramidal JPEG TIFFs with their um/px in the resolution tags, which OpenSlide reads as generic
TIFF. A quarter of them are scanned at 0.25 um/px ("40x") and the rest at 0.5 ("20x"), so level selection
is exercised; one slide has no resolution tags and gets its um/px from the table's ``mpp`` column.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pydantic import Field

from pathmil.fileio import atomic_output
from pathmil.settings import Settings


class DemoConfig(Settings):
    """The demo cohort to make (``slides.demo`` in the workflow, ``pathmil demo``'s flags)."""

    section = "demo"
    n_slides: int = Field(40, ge=2, description="number of slides")
    n_patients: int | None = Field(None, ge=2, description="number of patients; none: 3/4 of the slides")
    seed: int = Field(0, description="seed of the patients, their labels and the painting")
    size: tuple[int, int] = Field(
        (3072, 3584), description="height and width of a slide in pixels at 0.5 um/px (40x slides: twice)"
    )
    workers: int = Field(1, ge=1, description="processes painting slides (the result does not depend on it)")
    hue_shift: float = Field(
        0.0,
        ge=-90,
        le=90,
        description="another stain's look: rotate every pixel's hue by this many degrees (HSV)",
    )
    scale: float = Field(
        1.0,
        ge=0.5,
        le=2.0,
        description="another scanner's calibration: tissue looks this many times larger at the same um/px",
    )


STROMA_RGB = np.array([236, 170, 200], np.float32)  # eosin pink
TUMOUR_RGB = np.array([205, 150, 205], np.float32)  # purple-tinted cytoplasm
GLASS_RGB = np.array([242, 240, 244], np.float32)
NUCLEUS_RGB = np.array([70, 35, 120], np.float32)  # haematoxylin
LYMPHOCYTE_RGB = np.array([45, 25, 95], np.float32)
DEMO_COMPRESSIONS = ("jpeg", "zlib")


@dataclass
class Patient:
    patient_id: str
    grade: int
    stil: float
    tumour_share: float
    time: float
    event: int


def make_patients(rng: np.random.Generator, n_patients: int) -> list[Patient]:
    """Hidden properties and survival outcomes of the demo patients (balanced grades)."""
    grades = rng.permutation(np.arange(n_patients) % 2)
    patients = []
    for i, grade in enumerate(grades):
        stil = float(np.clip(rng.beta(1.2, 2.0) * 100, 1, 95))
        risk = 1.4 * grade - 0.03 * stil + rng.normal(0, 0.3)
        # log-normal accelerated failure time (sigma 0.5): the true risk orders the patients with a
        # c-index of about 0.89; an exponential model (about 0.75) leaves 30 patients too few to tell a
        # model that learned the risk from one that did not
        event_time = 40.0 * math.exp(-risk + 0.5 * rng.normal())
        censor_time = rng.uniform(24, 150)
        patients.append(
            Patient(
                patient_id=f"P{i:03d}",
                grade=int(grade),
                stil=round(stil, 1),
                tumour_share=float(rng.uniform(0.2, 0.5)),
                time=round(float(min(event_time, censor_time)), 2),
                event=int(event_time <= censor_time),
            )
        )
    return patients


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random values on a coarse grid, upsampled smoothly."""
    coarse = rng.random((max(2, shape[0] // scale + 2), max(2, shape[1] // scale + 2))).astype(np.float32)
    big = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    big -= big.min()
    return big / max(float(big.max()), 1e-6)


def _tissue_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """One or two large tissue fragments with irregular borders (bool, full resolution)."""
    small = (shape[0] // 8, shape[1] // 8)
    yy, xx = np.mgrid[0 : small[0], 0 : small[1]].astype(np.float32)
    field = np.zeros(small, np.float32)
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.uniform(0.35, 0.65) * small[0], rng.uniform(0.3, 0.7) * small[1]
        ry, rx = rng.uniform(0.28, 0.42) * small[0], rng.uniform(0.25, 0.4) * small[1]
        field = np.maximum(field, 1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2)
    field += 0.5 * (_smooth_noise(rng, small, 48) - 0.5) + 0.15 * (_smooth_noise(rng, small, 12) - 0.5)
    mask = cv2.resize((field > 0).astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask.astype(bool)


def _draw_nuclei(
    image: np.ndarray,
    rng: np.random.Generator,
    where: np.ndarray,
    density: float,
    radius: tuple[float, float],
    elongation: float,
    colour: np.ndarray,
    jitter: float,
) -> None:
    """Paint ``density`` nuclei per 1,000 px^2 of ``where`` as filled ellipses, in place."""
    ys, xs = np.nonzero(where[::4, ::4])
    count = rng.poisson(density * where.sum() / 1000.0)
    if count == 0 or len(ys) == 0:
        return
    pick = rng.integers(0, len(ys), count)
    centres = np.stack(
        [xs[pick] * 4 + rng.integers(0, 4, count), ys[pick] * 4 + rng.integers(0, 4, count)], 1
    )
    radii = rng.uniform(*radius, count)
    ratios = 1 + rng.uniform(0, elongation, count)
    angles = rng.uniform(0, 180, count)
    shades = rng.uniform(-jitter, jitter, count)
    for (x, y), r, q, a, s in zip(centres, radii, ratios, angles, shades):
        c = tuple(float(v) for v in np.clip(colour * (1 + s), 0, 255))
        cv2.ellipse(
            image, (int(x), int(y)), (max(1, round(r * q)), max(1, round(r / q))), float(a), 0, 360, c, -1
        )


def render_slide(rng: np.random.Generator, patient: Patient, shape: tuple[int, int]) -> np.ndarray:
    """An H&E-like RGB image at 0.5 um/px whose texture encodes the patient's grade and sTIL."""
    tissue = _tissue_mask(rng, shape)
    noise = _smooth_noise(rng, shape, 240)
    tumour = tissue & (noise > np.quantile(noise[tissue], 1 - patient.tumour_share))
    stroma = tissue & ~tumour
    shade = 0.88 + 0.24 * _smooth_noise(rng, shape, 24)[..., None]
    fibres = 0.93 + 0.1 * _smooth_noise(rng, (shape[0], shape[1] // 6), 3)
    fibres = cv2.resize(fibres, (shape[1], shape[0]))[..., None]
    image = np.where(
        tissue[..., None], np.where(tumour[..., None], TUMOUR_RGB, STROMA_RGB * fibres), GLASS_RGB
    )
    image = np.clip(image * np.where(tissue[..., None], shade, 1.0), 0, 255).astype(np.uint8)
    if patient.grade:  # high grade: large, pleomorphic, hyperchromatic nuclei
        _draw_nuclei(image, rng, tumour, 2.6, (6.0, 11.0), 0.8, NUCLEUS_RGB * 0.8, 0.25)
    else:  # low grade: small, regular nuclei
        _draw_nuclei(image, rng, tumour, 3.5, (3.5, 5.0), 0.2, NUCLEUS_RGB * 1.15, 0.1)
    _draw_nuclei(image, rng, stroma, 0.2, (2.5, 4.0), 0.6, NUCLEUS_RGB * 1.3, 0.15)  # fibroblasts
    _draw_nuclei(image, rng, stroma, 0.06 * patient.stil, (2.8, 3.6), 0.1, LYMPHOCYTE_RGB, 0.1)
    image = cv2.GaussianBlur(image, (3, 3), 0.8)
    noise = rng.normal(0, 4, image.shape).astype(np.float32)
    return np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def write_pyramidal_tiff(
    path: str | os.PathLike,
    rgb: np.ndarray,
    mpp: float | None,
    tile: int = 256,
    quality: int = 85,
    compression: str = "jpeg",
) -> None:
    """A tiled TIFF with a 2x pyramid down to ~512 px, resolution tags giving ``mpp`` (if any).

    ``compression``: ``jpeg`` (at ``quality``; tifffile needs imagecodecs for it) or ``zlib`` (lossless
    deflate, about 12x larger; tifffile writes it with Python's zlib alone, for machines without
    imagecodecs). OpenSlide reads both as generic TIFF.
    """
    import tifffile

    if compression not in DEMO_COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(DEMO_COMPRESSIONS)}, got '{compression}'")
    codec = {"compressionargs": {"level": quality}} if compression == "jpeg" else {}

    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tif:
        level, downsample = rgb, 1
        while True:
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * downsample)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                level,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subfiletype=1 if downsample > 1 else 0,
                **codec,
                **extra,
            )
            if min(level.shape[:2]) < 1024:
                break
            level = cv2.resize(
                level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA
            )
            downsample *= 2


@dataclass
class DemoSlide:
    """One planned demo slide: whose it is and how it is scanned."""

    index: int
    slide_id: str
    patient: Patient
    mpp: float | None  # written into the TIFF's resolution tags (None: no tags)
    table_mpp: float | None  # given in the table's mpp column instead


def plan_demo(n_slides: int = 40, n_patients: int | None = None, seed: int = 0) -> list[DemoSlide]:
    """The demo's slides and patients without painting anything (cheap: the workflow calls it to know the
    slide ids before the slides exist). Some patients have two slides (``n_slides - n_patients``)."""
    if n_patients is None:
        n_patients = max(2, math.ceil(n_slides * 0.75))
    if not 2 <= n_patients <= n_slides:
        raise ValueError(f"need 2 <= n_patients <= n_slides, got {n_patients} patients for {n_slides} slides")
    rng = np.random.default_rng(seed)
    patients = make_patients(rng, n_patients)
    owners = list(range(n_patients)) + sorted(
        rng.choice(n_patients, n_slides - n_patients, replace=False).tolist()
    )
    plan = []
    for index, owner in enumerate(owners):
        patient = patients[owner]
        slide_id = f"{patient.patient_id}-S{owners[:index].count(owner) + 1}"
        mpp: float | None = 0.25 if index % 4 == 3 else 0.5  # every fourth slide a "40x" scan
        table_mpp = None
        if index == 1:  # no resolution tags: the table supplies the um/px
            table_mpp, mpp = mpp, None
        plan.append(DemoSlide(index, slide_id, patient, mpp, table_mpp))
    return plan


def shift_look(rgb: np.ndarray, hue_shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """The same tissue as another lab and scanner would show it: hues rotated by ``hue_shift`` degrees
    (saturation and value kept, so tissue segmentation sees the same tissue) and the picture magnified by
    ``scale`` about its centre (a scanner whose true um/px differs from its tags), same size."""
    if hue_shift:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # OpenCV's hue runs 0-179 in steps of 2 degrees
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(hue_shift / 2)) % 180).astype(np.uint8)
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if scale != 1.0:
        height, width = rgb.shape[:2]
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), 0.0, scale)
        rgb = cv2.warpAffine(
            rgb, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=GLASS_RGB.tolist()
        )
    return rgb


def write_demo_slide(
    spec: DemoSlide,
    out_dir: Path,
    size_px: tuple[int, int],
    seed: int,
    compression: str = "jpeg",
    hue_shift: float = 0.0,
    scale: float = 1.0,
) -> dict:
    """Paint and write one planned slide (in another lab's look: :func:`shift_look`); return its row of the
    cohort table."""
    rgb = render_slide(np.random.default_rng([seed, spec.index]), spec.patient, size_px)
    rgb = shift_look(rgb, hue_shift, scale)
    if (spec.mpp or spec.table_mpp) == 0.25:  # the same tissue at twice the pixel density
        rgb = cv2.resize(rgb, (rgb.shape[1] * 2, rgb.shape[0] * 2), interpolation=cv2.INTER_LINEAR)
    path = out_dir / "slides" / f"{spec.slide_id}.tiff"
    write_pyramidal_tiff(path, rgb, spec.mpp, compression=compression)
    return cohort_row(spec, f"slides/{path.name}")


def cohort_row(spec: DemoSlide, path: str) -> dict:
    """A planned slide's row of the cohort table, with every task's labels (the workflow plans the demo's
    rows from this before the slides are painted)."""
    patient = spec.patient
    return {
        "slide_id": spec.slide_id,
        "patient_id": patient.patient_id,
        "path": path,
        "mpp": spec.table_mpp,
        "label": patient.grade,
        "time": patient.time,
        "event": patient.event,
        "stil": patient.stil,
    }


def make_demo_cohort(
    out_dir: str | os.PathLike,
    n_slides: int = 40,
    n_patients: int | None = None,
    size_px: tuple[int, int] = (3072, 3584),
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
    compression: str = "jpeg",
    hue_shift: float = 0.0,
    scale: float = 1.0,
) -> pd.DataFrame:
    """Write the demo slides and ``cohort.csv`` into ``out_dir``; return the table.

    ``size_px`` is (height, width) at 0.5 um/px; 40x slides are twice that in each direction. Slides are
    painted by ``workers`` processes; each slide has its own seed, so the result does not depend on them.
    ``compression`` as :func:`write_pyramidal_tiff` (``zlib`` where imagecodecs is missing). ``hue_shift``
    and ``scale`` give the cohort another stain and scanner look (:func:`shift_look`): the patients and
    their labels follow from ``seed`` alone.
    """
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from tqdm import tqdm

    out_dir = Path(out_dir)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    plan = plan_demo(n_slides, n_patients, seed)
    paint = partial(
        write_demo_slide,
        out_dir=out_dir,
        size_px=size_px,
        seed=seed,
        compression=compression,
        hue_shift=hue_shift,
        scale=scale,
    )
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.map(paint, plan) if pool is not None else map(paint, plan)
        rows = list(tqdm(results, total=len(plan), desc="demo", unit="slide", disable=not progress))
    table = pd.DataFrame(rows)
    with atomic_output(out_dir / "cohort.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table
