"""Benchmark of feature extraction: `pathmil extract` against the bare encoder and a CLAM-style loop.

For each encoder (default ``resnet50_trunc`` and ``mobilenet_v2``) at one batch size:

- bare encoder: tiles/s of the network alone on tiles already in memory (normalised, on the device), per
  setting (fp32 plain NCHW, fp32 channels_last, fp32 channels_last + TorchScript fusion, bf16 autocast
  channels_last, optionally torch.compile), with each setting's per-tile cosine similarity to plain fp32;
- pipeline: tiles/s of ``pathmil extract`` with its default settings (reading, resizing, normalising,
  encoding, writing; model loading excluded, as the facts JSON reports it) and its ratio to the bare
  encoder at the setting the pipeline chose;
- CLAM-style baseline: per-tile ``read_region(...).convert("RGB")`` + torchvision Resize/ToTensor/Normalize
  in a DataLoader (no workers on CPU, as CLAM's extract_features_fp.py), fp32 NCHW model, same weights.

The slide is the real H&E region (cmu_small_region.svs) tiled up 3 x 3 into a pyramidal JPEG TIFF, so tiles
decode real JPEG data. The CPU may be shared: every measurement is repeated (interleaved) and the table
shows the median and the best run; `uptime` load is recorded before and after.

    python benchmarks/bench_extract.py      # ~25 min on 2 busy cores: benchmarks/out/bench_extract.md (+ .json)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pathmil.config import ExtractConfig, TileConfig  # noqa: E402
from pathmil.features.bagfile import read_bag  # noqa: E402
from pathmil.features.encoders import create_encoder  # noqa: E402
from pathmil.features.extract import (  # noqa: E402
    EncoderRunner,
    TileBatches,
    cpu_has_fast_bf16,
    resolve_device,
    resolve_optimize,
    resolve_precision,
)
from pathmil.slide.tilefile import TileSet, read_tiles, write_tiles  # noqa: E402

WEIGHTS = {"mobilenet_v2": ROOT / ".testdata" / "weights" / "mobilenet_v2-b0353104.pth"}


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ------------------------------------------------------------------------------------------- inputs


def make_slide(work: Path) -> tuple[Path, Path]:
    """The real H&E region tiled up 3 x 3 (mirrored copies) into a pyramidal JPEG TIFF, and its tiles file."""
    from pathmil.demo import write_pyramidal_tiff
    from pathmil.slide.reader import Slide
    from pathmil.slide.tile import tile_slide

    with Slide(ROOT / ".testdata" / "slides" / "cmu_small_region.svs") as region:
        rgb = region.read_level(0)
        mpp = region.mpp
    row = np.concatenate([rgb, rgb[:, ::-1], rgb], axis=1)
    mosaic = np.ascontiguousarray(np.concatenate([row, row[::-1], row], axis=0))
    slide = work / "cmu_3x3.tiff"
    write_pyramidal_tiff(slide, mosaic, mpp, quality=90)
    tiles = work / "cmu_3x3_tiles.h5"
    tile_slide(slide, tiles, TileConfig(preset="bwh_biopsy", min_tissue=0.25))
    return slide, tiles


def limit_tiles(tiles_path: Path, n: int, out: Path) -> Path:
    tiles = read_tiles(tiles_path)
    keep = slice(0, min(n, len(tiles.coords)))
    fraction = tiles.tissue_fraction[keep] if tiles.tissue_fraction is not None else None
    write_tiles(out, TileSet(tiles.coords[keep], tiles.coords_attrs, tiles.attrs, fraction))
    return out


def tiles_in_memory(slide: Path, tiles_path: Path, preprocess, n: int) -> torch.Tensor:
    """uint8 N x H x W x 3 tiles exactly as the pipeline's readers produce them."""
    tiles = read_tiles(tiles_path)
    dataset = TileBatches(slide, "bench", None, tiles, preprocess)
    images, _, failed = dataset[list(range(min(n, len(tiles.coords))))]
    assert not failed
    return images


# ------------------------------------------------------------------------------------- measurements


@dataclasses.dataclass
class Setting:
    label: str
    precision: str
    optimize: str
    channels_last: bool


def bare_settings(device: torch.device, convolutional: bool, with_compile: bool) -> list[Setting]:
    settings = [Setting("fp32 NCHW (plain)", "fp32", "none", False)]
    if convolutional:
        settings.append(Setting("fp32 channels_last", "fp32", "none", True))
        if device.type == "cpu":
            settings.append(Setting("fp32 channels_last + jit fusion", "fp32", "jit", True))
    settings.append(
        Setting(f"bf16 autocast{' channels_last' if convolutional else ''}", "bf16", "none", convolutional)
    )
    if device.type == "cuda":
        settings.append(Setting("fp16 autocast", "fp16", "none", convolutional))
    if with_compile:
        settings.append(Setting("fp32 torch.compile (freezing)", "fp32", "compile", convolutional))
    return settings


def time_bare(
    runner: EncoderRunner, x: torch.Tensor, batch_size: int, max_batches: int
) -> tuple[float, torch.Tensor]:
    """tiles/s of the encoder alone over up to ``max_batches`` batches (one warm-up batch first)."""
    batches = list(torch.split(x, batch_size))[:max_batches]
    runner.encode(batches[0])  # warm-up: oneDNN primitive creation, TorchScript profiling
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = [runner.encode(b) for b in batches]
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    n = sum(len(b) for b in batches)
    return n / (time.perf_counter() - start), torch.cat(outs).cpu()


def cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    sims = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    return float(sims.min()), float(sims.mean())


def run_pipeline(name: str, slide: Path, tiles: Path, work: Path, args: argparse.Namespace) -> dict:
    """`pathmil extract` as a user runs it (a fresh process), default settings; returns its facts."""
    out = work / f"{name}_bag.h5"
    cmd = [sys.executable, "-m", "pathmil", "extract", str(slide), "--tiles", str(tiles), "--out", str(out)]
    cmd += ["--encoder", name, "--batch-size", str(args.batch_size), "--overwrite", "--device", args.device]
    cmd += ["--weights", str(WEIGHTS[name])] if name in WEIGHTS else ["--random-init"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    facts = json.loads(out.with_suffix(".json").read_text())
    facts["wall_s"] = time.perf_counter() - start
    facts["bag"] = out
    return facts


def clam_baseline(name: str, slide: Path, tiles_path: Path, batch_size: int, device: torch.device) -> float:
    """CLAM's extract_features_fp.py loop, written here: per-tile PIL read_region + torchvision transforms,
    DataLoader without workers on CPU, fp32 NCHW eager model under inference_mode."""
    import openslide
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    tiles = read_tiles(tiles_path)
    size, level = tiles.read_px, tiles.level
    transform = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )

    class WholeSlideBag(Dataset):
        def __init__(self) -> None:
            self.wsi = openslide.OpenSlide(str(slide))

        def __len__(self) -> int:
            return len(tiles.coords)

        def __getitem__(self, i: int):
            img = self.wsi.read_region(tuple(int(v) for v in tiles.coords[i]), level, (size, size)).convert(
                "RGB"
            )
            return transform(img)

    model = create_encoder(name, weights=WEIGHTS.get(name), random_init=name not in WEIGHTS).model.to(device)
    loader = DataLoader(
        WholeSlideBag(),
        batch_size=batch_size,
        **({"num_workers": 8, "pin_memory": True} if device.type == "cuda" else {}),
    )
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            model(batch.to(device)).cpu()
    return len(tiles.coords) / (time.perf_counter() - start)


def summarise(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} (best {max(values):.1f})"


# --------------------------------------------------------------------------------------------- main


def bench_encoder(name: str, slide: Path, tiles: Path, work: Path, args: argparse.Namespace) -> dict:
    """Interleaved repeats of every bare setting, the pipeline and the CLAM-style loop: the raw numbers."""
    device = resolve_device(args.device)
    encoder = create_encoder(name, weights=WEIGHTS.get(name), random_init=name not in WEIGHTS)
    images = tiles_in_memory(slide, tiles, encoder.preprocess, args.batch_size * args.batches)
    settings = bare_settings(device, encoder.convolutional, args.compile)
    runners = {}
    for s in settings:  # each setting gets its own copy: channels_last converts a module in place
        own = dataclasses.replace(encoder, model=copy.deepcopy(encoder.model))
        runner = EncoderRunner(own, device, s.precision, s.optimize, s.channels_last)
        runners[s.label] = (runner, runner.normalise(images))
    emulated_bf16 = device.type == "cpu" and not cpu_has_fast_bf16()
    speeds: dict[str, list[float]] = {s.label: [] for s in settings}
    features: dict[str, torch.Tensor] = {}
    pipeline, clam = [], []
    for _ in range(args.repeats):
        for s in settings:
            runner, x = runners[s.label]
            slow = s.precision == "bf16" and emulated_bf16  # many times slower: one batch is enough
            speed, out = time_bare(runner, x, args.batch_size, 1 if slow else args.batches)
            speeds[s.label].append(speed)
            features.setdefault(s.label, out)
            print(f"  {name} bare {s.label}: {speed:.1f} tiles/s (load {load()})", flush=True)
        facts = run_pipeline(name, slide, tiles, work, args)
        pipeline.append(facts)
        print(f"  {name} pipeline: {facts['tiles_per_second']:.1f} tiles/s ({facts['optimize']})", flush=True)
        if args.clam:
            clam.append(clam_baseline(name, slide, tiles, args.batch_size, device))
            print(f"  {name} CLAM-style: {clam[-1]:.1f} tiles/s", flush=True)

    reference = features[settings[0].label]
    cosines = {label: cosine(out[: len(reference)], reference[: len(out)]) for label, out in features.items()}
    bag = read_bag(pipeline[0]["bag"]).features.astype(np.float32)
    cosines["pipeline"] = cosine(torch.from_numpy(bag[: len(reference)]), reference[: len(bag)])
    precision = resolve_precision(ExtractConfig().precision, device)
    optimize = resolve_optimize(ExtractConfig().optimize, device, precision, encoder)
    match = next(
        s.label
        for s in settings
        if s.precision == precision and s.optimize == optimize and s.channels_last == encoder.convolutional
    )
    return {
        "encoder": name,
        "settings": [dataclasses.asdict(s) for s in settings],
        "bare": speeds,
        "cosine": cosines,
        "pipeline": [
            {k: f[k] for k in ("tiles_per_second", "n_tiles", "workers", "precision", "optimize", "seconds")}
            | {"wall_s": round(f["wall_s"], 2)}
            for f in pipeline
        ],
        "pipeline_setting": match,
        "clam": clam,
    }


def per_repeat(a: list[float], b: list[float]) -> float:
    """Median of the ratios of measurements taken side by side: steadier on a shared CPU than the ratio
    of the medians."""
    return statistics.median(x / y for x, y in zip(a, b))


def table_rows(raw: dict) -> list[str]:
    name, speeds, cos = raw["encoder"], raw["bare"], raw["cosine"]
    rows = [
        f"| {name} | bare: {label} | {summarise(values)} | {cos[label][0]:.5f} / {cos[label][1]:.5f} |"
        for label, values in speeds.items()
    ]
    pipe = [p["tiles_per_second"] for p in raw["pipeline"]]
    first = raw["pipeline"][0]
    waiting = statistics.median(
        p["seconds"]["wait_for_tiles"] / p["seconds"]["total"] for p in raw["pipeline"]
    )
    rows.append(
        f"| {name} | **pipeline** `pathmil extract` ({first['precision']}, {first['optimize']}; "
        f"{first['n_tiles']} tiles, {first['workers']} reader; waiting for tiles {waiting:.0%} of the loop) | "
        f"{summarise(pipe)} | {cos['pipeline'][0]:.5f} / {cos['pipeline'][1]:.5f} (float16 on disk) |"
    )
    plain, match = next(iter(speeds)), raw["pipeline_setting"]
    rows.append(f"| {name} | pipeline / bare ({match}) | **{per_repeat(pipe, speeds[match]):.2f}** | |")
    if raw["clam"]:
        rows.append(
            f"| {name} | CLAM-style loop (PIL + torchvision, fp32 NCHW) | {summarise(raw['clam'])} | |"
        )
        rows.append(f"| {name} | pipeline / CLAM-style | **{per_repeat(pipe, raw['clam']):.2f}** | |")
    for label in speeds:
        if label.startswith("bf16"):
            rows.append(
                f"| {name} | {label} / fp32 plain speed | {per_repeat(speeds[label], speeds[plain]):.2f} | |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoders", nargs="+", default=["resnet50_trunc", "mobilenet_v2"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3, help="batches per bare-encoder measurement")
    parser.add_argument("--max-tiles", type=int, default=320, help="tiles the pipeline and CLAM loop read")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow start)")
    parser.add_argument("--no-clam", dest="clam", action="store_false")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "out" / "bench_extract.md",
        help="markdown table (the raw numbers go beside it as .json)",
    )
    args = parser.parse_args()

    device = resolve_device(args.device)
    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = load()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        slide, all_tiles = make_slide(work)
        tiles = limit_tiles(all_tiles, args.max_tiles, work / "tiles.h5")
        raw = []
        for name in args.encoders:
            print(f"{name} ...", flush=True)
            raw.append(bench_encoder(name, slide, tiles, work, args))
    rows = [row for result in raw for row in table_rows(result)]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    header = [
        f"Feature extraction benchmark, {started}: {cpu_name()}, {os.cpu_count()} CPUs "
        f"(torch capability {torch.backends.cpu.get_cpu_capability()}, AMX/AVX-512 BF16: "
        f"{resolve_precision('auto', torch.device('cpu')) == 'bf16'}), GPU {gpu}, device {device}, "
        f"torch {torch.__version__}, batch {args.batch_size}, {args.repeats} repeats; load average "
        f"{load_before} before, {load()} after.",
        "",
        "| encoder | what | tiles/s: median (best) | cosine to fp32 plain: min / mean |",
        "|---|---|---|---|",
    ]
    table = "\n".join(header + rows) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps({"header": header[0], "results": raw}, indent=1))


if __name__ == "__main__":
    main()
