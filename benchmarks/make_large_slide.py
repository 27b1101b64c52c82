"""Build a large pyramidal JPEG TIFF from real H&E texture, for the tiling benchmark.

The tiling benchmark needs a slide the size of a real resection scan (CLAM's measurement in issue 2 used
40,960 x 40,960 px with 9,495 tissue tiles of 256 px, about 37 % of the grid), but the repository ships only
a 2220 x 2967 px H&E region (cmu_small_region.svs). This script paints a big slide from it:

- Texture: 512 x 512 px windows of the real slide that are almost all tissue, each in one of the eight
  mirror/rotation variants and with a slight stain jitter, laid as a mosaic whose block is chosen at random.
- Layout: a smooth random field at 1/16 resolution, thresholded to several tissue pieces with irregular
  borders, a few holes (glass inside tissue) and small debris that the ``tcga`` preset's area filter drops.
  The threshold is set so the tissue covers ``--tissue`` of the slide (default 0.35, which gives about CLAM's 9,495 tiles).
- Glass: off-white with a little sensor noise, as a scanner gives.

The file is written level by level (downsamples 1, 4, 16, 64, like an Aperio pyramid) from tile generators,
so memory stays under 1 GB whatever the slide size. Lower levels are painted from downsampled texture
blocks (the block grid is aligned to every level), so they match level 0 as a scanner's pyramid does.
OpenSlide opens the result as generic TIFF, with its um/px from the resolution tags.

    python benchmarks/make_large_slide.py --out benchmarks/data/large.tiff
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / ".testdata" / "slides" / "cmu_small_region.svs"
TILE = 256
BLOCK = 512  # texture block at level 0; divisible by every downsample below
DOWNSAMPLES = (1, 4, 16, 64)  # an Aperio-like pyramid; segmentation reads the 1/64 level
FIELD_DOWNSAMPLE = 16  # resolution of the layout field
GLASS_RGB = np.array([243, 241, 245], np.float32)
EDGE_SOFTNESS = 40.0  # field units to full opacity: tissue borders a few pixels wide


def tissue_windows(source: Path, n_windows: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random BLOCK x BLOCK windows of the source slide that are at least 90 % stained tissue."""
    with openslide.OpenSlide(str(source)) as handle:
        rgb = np.asarray(handle.read_region((0, 0), 0, handle.dimensions))[..., :3].copy()
    sat = cv2.medianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1], 7)
    tissue = (sat > 20).astype(np.uint8)
    integral = cv2.integral(tissue, sdepth=cv2.CV_64F)
    area = (
        integral[BLOCK:, BLOCK:]
        - integral[:-BLOCK, BLOCK:]
        - integral[BLOCK:, :-BLOCK]
        + integral[:-BLOCK, :-BLOCK]
    ) / BLOCK**2
    ys, xs = np.nonzero(area >= 0.9)
    if len(ys) == 0:
        raise SystemExit(f"{source} has no {BLOCK} px window of tissue")
    pick = rng.choice(len(ys), size=n_windows, replace=len(ys) < n_windows)
    return [rgb[ys[i] : ys[i] + BLOCK, xs[i] : xs[i] + BLOCK] for i in pick]


def texture_bank(windows: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """All eight mirror/rotation variants of each window, each with its own slight stain jitter."""
    variants = []
    for window in windows:
        for k in range(8):
            block = np.rot90(window, k % 4)
            block = block[:, ::-1] if k >= 4 else block
            gain = rng.uniform(0.94, 1.06, 3).astype(np.float32)
            variants.append(np.clip(block * gain, 0, 255).astype(np.uint8))
    return np.stack(variants)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Noise in [0, 1] with features about ``scale`` pixels wide."""
    coarse = rng.random((shape[0] // scale + 2, shape[1] // scale + 2)).astype(np.float32)
    field = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    field -= field.min()
    return field / field.max()


def layout_field(rng: np.random.Generator, size: int, tissue: float, n_pieces: int) -> np.ndarray:
    """A field at 1/FIELD_DOWNSAMPLE resolution, positive on tissue, crossing 0 at its border.

    Pieces are noisy ellipses, one per cell of a jittered grid (like serial sections on a glass slide),
    kept off the slide's edges; holes are small discs cut out of them; debris are specks far below the
    ``tcga`` preset's 16 reference patches. The threshold is the quantile that makes ``tissue`` of the
    slide positive.
    """
    n = size // FIELD_DOWNSAMPLE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    rows = max(1, round(np.sqrt(n_pieces)))
    cols = -(-n_pieces // rows)
    field = np.full((n, n), -1.0, np.float32)
    centres = []
    for i in range(n_pieces):
        cy = (i // cols + 0.5 + rng.uniform(-0.1, 0.1)) / rows
        cx = (i % cols + 0.5 + rng.uniform(-0.1, 0.1)) / cols
        ry, rx = rng.uniform(0.3, 0.42) / rows, rng.uniform(0.3, 0.42) / cols
        angle = rng.uniform(-0.4, 0.4)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        field = np.maximum(field, 1 - u**2 - v**2)
        centres.append((cy, cx))
    field += 0.7 * (smooth_noise(rng, (n, n), n // 10) - 0.5) + 0.2 * (
        smooth_noise(rng, (n, n), n // 80) - 0.5
    )
    edge = np.minimum(np.minimum(yy, 1 - yy), np.minimum(xx, 1 - xx))
    field -= 20 * np.maximum(0, 0.04 - edge)  # glass all around, as on a real slide
    field -= np.quantile(field, 1 - tissue)
    for cy, cx in centres[::2]:  # holes: glass inside the tissue (vessels, tears)
        r = rng.uniform(0.008, 0.02)
        oy, ox = rng.uniform(-0.05, 0.05, 2)
        field[(yy - cy - oy) ** 2 + (xx - cx - ox) ** 2 < r**2] = -1.0
    for _ in range(12):  # debris: specks of a few hundred microns
        cy, cx = rng.uniform(0.03, 0.97, 2)
        speck = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(0.002, 0.006) ** 2
        field[speck] = np.maximum(field[speck], 0.5)
    return field


def render_tile(
    level: int, tx: int, ty: int, bank: np.ndarray, choice: np.ndarray, field: np.ndarray, glass: np.ndarray
) -> np.ndarray:
    """Tile (tx, ty) of the level with downsample ``level``: texture blended into glass by the field."""
    block = BLOCK // level
    px = tx * TILE + np.arange(TILE)
    py = ty * TILE + np.arange(TILE)
    bx = np.minimum(px // block, choice.shape[1] - 1)
    by = np.minimum(py // block, choice.shape[0] - 1)
    texture = bank[choice[by[:, None], bx[None, :]], (py % block)[:, None], (px % block)[None, :]]
    scale = level / FIELD_DOWNSAMPLE  # field pixels per level pixel; sample at pixel centres
    map_x = np.broadcast_to(((px + 0.5) * scale - 0.5).astype(np.float32)[None, :], (TILE, TILE))
    map_y = np.broadcast_to(((py + 0.5) * scale - 0.5).astype(np.float32)[:, None], (TILE, TILE))
    value = cv2.remap(
        field,
        np.ascontiguousarray(map_x),
        np.ascontiguousarray(map_y),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    alpha = np.clip(value * EDGE_SOFTNESS, 0, 1)[..., None]
    return (alpha * texture + (1 - alpha) * glass).astype(np.uint8)


def tiles(
    level: int, size: int, bank: np.ndarray, choice: np.ndarray, field: np.ndarray, glass_bank: np.ndarray
) -> Iterator[np.ndarray]:
    """The level's tiles in row-major order (edge tiles painted whole; tifffile stores them padded)."""
    count = -(-size // TILE)
    for ty in range(count):
        for tx in range(count):
            glass = glass_bank[(tx * 7 + ty * 13) % len(glass_bank)]
            yield render_tile(level, tx, ty, bank, choice, field, glass)


def make_large_slide(
    out: Path,
    size: int,
    mpp: float,
    tissue: float,
    n_pieces: int,
    quality: int,
    seed: int,
    downsamples: tuple[int, ...] = DOWNSAMPLES,
) -> None:
    """Write the slide to ``out`` (BigTIFF, tiled JPEG), one page per downsample."""
    if size % BLOCK:
        raise SystemExit(f"--size must be a multiple of {BLOCK}")
    if downsamples[0] != 1 or any(BLOCK % d for d in downsamples):
        raise SystemExit(f"--levels must start at 1 and divide {BLOCK}, got {downsamples}")
    rng = np.random.default_rng(seed)
    windows = tissue_windows(SOURCE, 16, rng)
    bank0 = texture_bank(windows, rng)
    choice = rng.integers(0, len(bank0), (size // BLOCK, size // BLOCK))
    field = layout_field(rng, size, tissue, n_pieces)
    glass_bank = np.stack(
        [np.clip(GLASS_RGB + rng.normal(0, 1.5, (TILE, TILE, 3)), 0, 255) for _ in range(8)]
    ).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level in downsamples:
            start = time.perf_counter()
            bank = np.stack(
                [cv2.resize(b, (BLOCK // level,) * 2, interpolation=cv2.INTER_AREA) for b in bank0]
            )
            per_cm = 1e4 / (mpp * level)
            tif.write(
                tiles(level, size // level, bank, choice, field, glass_bank),
                shape=(size // level, size // level, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",  # tifffile stores JPEG as YCbCr 4:2:0, as Aperio does
                compression="jpeg",
                compressionargs={"level": quality},
                subfiletype=1 if level > 1 else 0,
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                description=f"pathmil benchmark slide from {SOURCE.name}, seed {seed}",
            )
            print(f"level downsample {level:>2}: {size // level} px in {time.perf_counter() - start:.1f} s")
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "data" / "large.tiff")
    parser.add_argument("--size", type=int, default=40960, help="side in pixels at level 0 (default 40960)")
    parser.add_argument("--mpp", type=float, default=0.5, help="um per pixel at level 0 (default 0.5)")
    parser.add_argument("--tissue", type=float, default=0.35, help="tissue share of the slide (default 0.35)")
    parser.add_argument("--pieces", type=int, default=5, help="number of tissue pieces (default 5)")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality (default 80)")
    parser.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=list(DOWNSAMPLES),
        help="pyramid downsamples (default 1 4 16 64; 1 4 16 makes segmentation read a 2560 px level)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not SOURCE.is_file():
        raise SystemExit(f"{SOURCE} is missing: run scripts/fetch_test_data.sh first")
    start = time.perf_counter()
    make_large_slide(
        args.out, args.size, args.mpp, args.tissue, args.pieces, args.quality, args.seed, tuple(args.levels)
    )
    with openslide.OpenSlide(str(args.out)) as handle:
        print(
            f"wrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s: "
            f"levels {handle.level_dimensions}, mpp {handle.properties.get('openslide.mpp-x')}"
        )


if __name__ == "__main__":
    main()
