"""Heatmap cost on CPU: `pathmil heatmap` for a slide with 20,000 tiles (target: under 10 s).

The slide is a synthetic 36,864 x 36,864 px pyramidal TIFF (levels 1, 1/4, 1/16, 1/64, like an Aperio 20x
scan of 1.7 x 1.7 cm at 0.5 um/px) tiled into 144 x 144 = 20,736 tiles of 256 px, with a bag of 1,024-dim
float16 features and a randomly initialised ABMIL checkpoint. Slide, bag and checkpoint are made once in
``--data``. Each case runs ``make_heatmap`` (load the model and the bag, forward pass, thumbnail, painting,
PNG, and the montage of the top and bottom 8 tiles) in a fresh subprocess, so its first run is cold
(imports, file cache) and its peak resident memory is its own; the best of the next ``--repeats`` runs is
the warm time. Usage:

    python benchmarks/bench_heatmap.py [--side 36864] [--threads 1] [--out benchmarks/out/heatmap.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TILE = 256
MPP = 0.5


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_slide(path: Path, side: int) -> None:
    """A JPEG-tiled pyramid whose tiles are drawn from a few textured ones (cheap to make at any size)."""
    import numpy as np
    import tifffile

    from pathmil.fileio import atomic_output

    rng = np.random.default_rng(0)
    patterns = [
        np.repeat(np.repeat(rng.integers(90, 250, (16, 16, 3), dtype=np.uint8), 16, 0), 16, 1)
        for _ in range(8)
    ]

    def tiles(level_side: int):
        n = -(-level_side // TILE)
        for i in range(n * n):
            yield patterns[(i * 7 + i // n) % len(patterns)]

    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        downsample = 1
        while side // downsample >= 512:
            level_side = side // downsample
            per_cm = 1e4 / (MPP * downsample)
            tif.write(
                tiles(level_side),
                shape=(level_side, level_side, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                photometric="rgb",
                subfiletype=1 if downsample > 1 else 0,
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
            )
            downsample *= 4


def make_data(root: Path, side: int) -> dict[str, str]:
    """The slide, a bag of every tile of its grid, and an ABMIL checkpoint (made once)."""

    import numpy as np
    import pandas as pd

    from pathmil.features.bagfile import write_bag
    from pathmil.models import create_model
    from pathmil.models.checkpoint import save_checkpoint
    from pathmil.tasks import create_task
    from pathmil.training.run import TrainConfig

    paths = {k: root / f"{side}{ext}" for k, ext in (("slide", ".tiff"), ("bag", ".h5"), ("model", ".pt"))}
    root.mkdir(parents=True, exist_ok=True)
    if not paths["slide"].is_file():
        start = time.perf_counter()
        write_slide(paths["slide"], side)
        print(f"wrote {paths['slide']} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not paths["bag"].is_file():
        n = side // TILE
        rows, cols = np.divmod(np.arange(n * n), n)
        coords = np.stack([cols * TILE, rows * TILE], 1)
        features = np.random.default_rng(1).normal(size=(n * n, 1024)).astype(np.float16)
        attrs = {"patch_size": TILE, "patch_level": 0, "patch_size_level0": TILE}
        write_bag(paths["bag"], features, coords, attrs, {"slide_id": "bench", "encoder": "bench"})
    if not paths["model"].is_file():
        import torch

        torch.manual_seed(0)
        task = create_task("classification")
        task.fit(pd.DataFrame({"label": [0, 1]}))
        model = create_model("abmil", in_dim=1024, n_outputs=2)
        payload = {
            "config": TrainConfig(aggregator="abmil").to_dict(),
            "task": task.state_dict(),
            "model": model.state_dict(),
            "aggregator": "abmil",
            "in_dim": 1024,
            "n_outputs": 2,
            "features": {"dim": 1024, "encoder": "bench", "random_init": False},
        }
        save_checkpoint(paths["model"], payload)
    return {k: str(v) for k, v in paths.items()}


def case_heatmap(data: dict[str, str], out_dir: str, smooth: float, repeats: int) -> dict:
    """Cold run, then the best of ``repeats`` warm runs, of the whole heatmap stage."""
    from pathmil.evaluation.heatmap import HeatmapConfig, make_heatmap

    config = HeatmapConfig(smooth=smooth)
    out = Path(out_dir)
    runs = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        facts = make_heatmap(
            data["model"],
            data["bag"],
            data["slide"],
            out / "heatmap.png",
            montage=out / "montage.png",
            config=config,
        )
        runs.append((time.perf_counter() - start, facts["steps"]))
    cold, warm = runs[0], min(runs[1:], key=lambda r: r[0]) if repeats else runs[0]
    return {
        "n_tiles": facts["n_tiles"],
        "cold_s": cold[0],
        "warm_s": warm[0],
        "steps": warm[1],
        "peak_rss_mb": peak_rss_mb(),
        "smooth": smooth,
    }


def run_case(threads: int, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, __file__, "--case", *args], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=144 * TILE, help="slide side in level-0 pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenCV threads of the measured process")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=HERE / "data" / "heatmap")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "heatmap.md")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        import cv2
        import torch

        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        data, out_dir, smooth, repeats = (
            json.loads(args.case[0]),
            args.case[1],
            float(args.case[2]),
            int(args.case[3]),
        )
        print(json.dumps(case_heatmap(data, out_dir, smooth, repeats)))
        return
    data = make_data(args.data, args.side)
    out_dir = args.out.parent / "heatmap"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [
        run_case(args.threads, json.dumps(data), str(out_dir), str(smooth), str(args.repeats))
        for smooth in (0.0, 1.0)
    ]
    load = os.getloadavg()
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s); "
        f"{time.strftime('%Y-%m-%d')}; load average {load[0]:.1f} (1 min), {load[1]:.1f} (5 min)",
        "",
        f"Slide {args.side:,} x {args.side:,} px (JPEG pyramid 1, 1/4, 1/16, 1/64), {results[0]['n_tiles']:,} tiles "
        "of 256 px, 1,024-dim float16 features, ABMIL; heatmap thumbnail 2,048 px, montage of 2 x 8 tiles.",
        "",
        "| case | cold (s) | warm (s) | load | model | thumbnail | paint | write PNG | montage | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["steps"]
        name = "no smoothing" if r["smooth"] == 0 else f"smoothing sigma {r['smooth']:g} tile"
        lines.append(
            f"| {name} | {r['cold_s']:.2f} | {r['warm_s']:.2f} | {s['load']:.2f} | {s['model']:.2f} | "
            f"{s['thumbnail']:.2f} | {s['paint']:.2f} | {s['write']:.2f} | {s['montage']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
