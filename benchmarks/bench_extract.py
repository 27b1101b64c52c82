"""Benchmark of feature extraction: the pipeline against the bare encoder and a CLAM-style loop.

For each encoder (default ``resnet50_trunc`` and ``mobilenet_v2``) at one batch size:

- bare encoder: the network alone on tiles already in memory (normalised, on the device), per setting
  (fp32 plain NCHW, fp32 channels_last, fp32 channels_last + TorchScript fusion, bf16 autocast, optionally
  torch.compile), with each setting's per-tile cosine similarity to plain fp32;
- pipeline: ``extract_slide`` (what ``pathmil extract`` runs) with the default settings: reading in
  worker processes, resizing, normalising, encoding, writing the bag; the model is built beforehand, as
  the facts JSON's tiles/s leaves model loading out. One run of the command itself is timed too;
- CLAM-style baseline, written here: per-tile ``read_region(...).convert("RGB")`` + torchvision
  Resize/ToTensor/Normalize in a DataLoader without workers on CPU (as CLAM's extract_features_fp.py),
  fp32 NCHW model, the same weights.

Every measurement reports wall-clock tiles/s and tiles per CPU-second (user + system time of this process
and its reaped children, i.e. the tile readers). On a CPU shared with other jobs the wall-clock numbers
swing by 2-3x from minute to minute; CPU time is far steadier, and on a quiet machine where the encoder
keeps every core busy the two give the same ratios. Ratios are medians of per-repeat ratios (measurements
taken side by side). The slide is the real H&E region (cmu_small_region.svs) tiled up 3 x 3 into a pyramidal
JPEG TIFF, so tiles decode real JPEG data.

    python benchmarks/bench_extract.py   # ~30 min on 2 busy cores: benchmarks/out/bench_extract.md (+ .json)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pathmil.features.bagfile import read_bag  # noqa: E402
from pathmil.features.encoders import Encoder, create_encoder  # noqa: E402
from pathmil.features.extract import (  # noqa: E402
    EncoderRunner,
    ExtractConfig,
    FeatureExtractor,
    TileBatches,
    cpu_has_fast_bf16,
    extract_slide,
    resolve_device,
)
from pathmil.slide.tile import TileConfig  # noqa: E402
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


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have exited (tile readers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclasses.dataclass
class Timing:
    tiles: int
    wall: float
    cpu: float

    @property
    def per_s(self) -> float:
        return self.tiles / self.wall

    @property
    def per_cpu_s(self) -> float:
        return self.tiles / self.cpu


def timed(tiles: int, work: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), cpu_seconds()
    work()
    return Timing(tiles, time.perf_counter() - wall, cpu_seconds() - cpu)


# ------------------------------------------------------------------------------------------- inputs


def make_slide(work: Path, repeat: int = 3, compression: str = "jpeg") -> tuple[Path, Path]:
    """The real H&E region tiled up ``repeat`` x ``repeat`` (mirrored copies) into a pyramidal TIFF
    (``compression`` as ``write_pyramidal_tiff``: jpeg, or zlib where imagecodecs is missing), and its
    tiles file."""
    from pathmil.demo import write_pyramidal_tiff
    from pathmil.slide.reader import Slide
    from pathmil.slide.tile import tile_slide

    with Slide(ROOT / ".testdata" / "slides" / "cmu_small_region.svs") as region:
        rgb = region.read_level(0)
        mpp = region.mpp
    row = np.concatenate([rgb if i % 2 == 0 else rgb[:, ::-1] for i in range(repeat)], axis=1)
    mosaic = np.ascontiguousarray(
        np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(repeat)], axis=0)
    )
    slide = work / f"cmu_{repeat}x{repeat}.tiff"
    write_pyramidal_tiff(slide, mosaic, mpp, quality=90, compression=compression)
    tiles = work / f"cmu_{repeat}x{repeat}_tiles.h5"
    tile_slide(slide, tiles, TileConfig(preset="bwh_biopsy", min_tissue=0.25))
    return slide, tiles


def limit_tiles(tiles_path: Path, n: int, out: Path) -> Path:
    tiles = read_tiles(tiles_path)
    keep = slice(0, min(n, len(tiles.coords)))
    fraction = tiles.tissue_fraction[keep] if tiles.tissue_fraction is not None else None
    write_tiles(out, TileSet(tiles.coords[keep], tiles.coords_attrs, tiles.attrs, fraction))
    return out


def repeat_tiles(tiles_path: Path, passes: int, out: Path) -> Path:
    """The tiles file with its tile list ``passes`` times over, for a pipeline measured at a typical
    slide's tile count on a smaller slide (OpenSlide's cache holds far less than one pass)."""
    tiles = read_tiles(tiles_path)
    fraction = tiles.tissue_fraction
    write_tiles(
        out,
        TileSet(
            np.tile(tiles.coords, (passes, 1)),
            tiles.coords_attrs,
            tiles.attrs,
            np.tile(fraction, passes) if fraction is not None else None,
        ),
    )
    return out


def tiles_in_memory(slide: Path, tiles_path: Path, preprocess, n: int) -> torch.Tensor:
    """uint8 N x H x W x 3 tiles exactly as the pipeline's readers produce them."""
    tiles = read_tiles(tiles_path)
    images, _, failed = TileBatches(slide, "bench", None, tiles, preprocess)[
        list(range(min(n, len(tiles.coords))))
    ]
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
    layout = " channels_last" if convolutional else ""
    settings.append(Setting(f"bf16 autocast{layout}", "bf16", "none", convolutional))
    if device.type == "cuda":
        settings.append(Setting(f"fp16 autocast{layout}", "fp16", "none", convolutional))
    if with_compile:
        settings.append(Setting("fp32 torch.compile (freezing)", "fp32", "compile", convolutional))
    return settings


def time_bare(
    runner: EncoderRunner, x: torch.Tensor, batch_size: int, max_batches: int
) -> tuple[Timing, torch.Tensor]:
    """The encoder alone over up to ``max_batches`` batches (one warm-up batch first)."""
    batches = list(torch.split(x, batch_size))[:max_batches]
    runner.encode(batches[0])  # warm-up: oneDNN primitives, TorchScript profiling, compilation
    outs: list[torch.Tensor] = []

    def run() -> None:
        outs.extend(runner.encode(b) for b in batches)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()

    timing = timed(sum(len(b) for b in batches), run)
    return timing, torch.cat(outs).cpu()


def cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    n = min(len(a), len(b))
    sims = torch.nn.functional.cosine_similarity(a[:n].double(), b[:n].double(), dim=1)
    return float(sims.min()), float(sims.mean())


def clam_loop(
    encoder: Encoder, slide: Path, tiles_path: Path, batch_size: int, device: torch.device
) -> Timing:
    """CLAM's extract_features_fp.py loop: per-tile PIL read_region + torchvision transforms, DataLoader
    without workers on CPU (8 with pinned memory on CUDA), fp32 NCHW eager model under inference_mode."""
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

        def __getitem__(self, i: int) -> torch.Tensor:
            xy = tuple(int(v) for v in tiles.coords[i])
            return transform(self.wsi.read_region(xy, level, (size, size)).convert("RGB"))

    model = copy.deepcopy(encoder.model).to(device)
    kwargs = {"num_workers": 8, "pin_memory": True} if device.type == "cuda" else {}
    loader = DataLoader(WholeSlideBag(), batch_size=batch_size, **kwargs)

    def run() -> None:
        with torch.inference_mode():
            for batch in loader:
                model(batch.to(device)).cpu()

    return timed(len(tiles.coords), run)


def cli_run(name: str, slide: Path, tiles: Path, work: Path, args: argparse.Namespace) -> dict:
    """`pathmil extract` as a user runs it: a fresh process, default settings."""
    out = work / f"{name}_cli.h5"
    cmd = [sys.executable, "-m", "pathmil", "extract", str(slide), "--tiles", str(tiles), "--out", str(out)]
    cmd += ["--encoder", name, "--batch-size", str(args.batch_size), "--overwrite", "--device", args.device]
    cmd += ["--weights", str(WEIGHTS[name])] if name in WEIGHTS else ["--random-init"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    facts = json.loads(out.with_suffix(".json").read_text())
    return {"wall_s": time.perf_counter() - start, "tiles_per_second": facts["tiles_per_second"]}


# ------------------------------------------------------------------------------------------ runs


def bench_encoder(name: str, slide: Path, tiles: Path, work: Path, args: argparse.Namespace) -> dict:
    """Interleaved repeats of every bare setting, the pipeline and the CLAM-style loop: the raw numbers."""
    device = resolve_device(args.device)
    weights = WEIGHTS.get(name)
    encoder = create_encoder(name, weights=weights, random_init=weights is None)
    images = tiles_in_memory(slide, tiles, encoder.preprocess, args.batch_size * args.batches)
    settings = bare_settings(device, encoder.convolutional, args.compile)
    runners = {}
    for s in settings:  # each setting gets its own copy: channels_last converts a module in place
        own = dataclasses.replace(encoder, model=copy.deepcopy(encoder.model))
        runner = EncoderRunner(own, device, s.precision, s.optimize, s.channels_last)
        runners[s.label] = (runner, runner.normalise(images))
    config = ExtractConfig(
        encoder=name,
        weights=str(weights) if weights else None,
        random_init=weights is None,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=True,
    )
    pipeline = FeatureExtractor(config)
    chosen = pipeline.runner  # built before timing: the facts' tiles/s leave model loading out too
    match = next(
        s.label
        for s in settings
        if (s.precision, s.optimize, s.channels_last)
        == (chosen.precision, chosen.optimize, chosen.channels_last)
    )
    emulated_bf16 = device.type == "cpu" and not cpu_has_fast_bf16()
    timings: dict[str, list[Timing]] = {s.label: [] for s in settings} | {"pipeline": [], "clam": []}
    features: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for s in settings:
            runner, x = runners[s.label]
            slow = s.precision == "bf16" and emulated_bf16  # many times slower: one batch is enough
            timing, out = time_bare(runner, x, args.batch_size, 1 if slow else args.batches)
            timings[s.label].append(timing)
            features.setdefault(s.label, out)
            print(
                f"  {name} bare {s.label}: {timing.per_s:.1f} tiles/s, {timing.per_cpu_s:.2f}/CPU-s (load {load()})"
            )
        facts = {}
        n = len(read_tiles(tiles).coords)
        timing = timed(
            n, lambda out=facts: out.update(extract_slide(slide, tiles, work / f"{name}.h5", pipeline))
        )
        timings["pipeline"].append(timing)
        print(f"  {name} pipeline: {timing.per_s:.1f} tiles/s, {timing.per_cpu_s:.2f}/CPU-s", flush=True)
        if args.clam:
            timings["clam"].append(clam_loop(encoder, slide, tiles, args.batch_size, device))
            print(f"  {name} CLAM-style: {timings['clam'][-1].per_s:.1f} tiles/s", flush=True)
    reference = features[settings[0].label]
    cosines = {label: cosine(out, reference) for label, out in features.items()}
    cosines["pipeline"] = cosine(
        torch.from_numpy(read_bag(work / f"{name}.h5").features.astype(np.float32)), reference
    )
    return {
        "encoder": name,
        "pipeline_setting": match,
        "pipeline_facts": {k: facts[k] for k in ("n_tiles", "workers", "precision", "optimize", "seconds")},
        "cli": cli_run(name, slide, tiles, work, args),
        "timings": {k: [dataclasses.asdict(t) for t in v] for k, v in timings.items()},
        "cosine": cosines,
    }


def summarise(timings: list[dict]) -> str:
    wall = [t["tiles"] / t["wall"] for t in timings]
    cpu = [t["tiles"] / t["cpu"] for t in timings]
    return f"{statistics.median(wall):.1f} (best {max(wall):.1f}) | {statistics.median(cpu):.2f}"


def ratio(a: list[dict], b: list[dict]) -> str:
    """Medians of per-repeat ratios, wall clock and CPU time: steadier than ratios of medians."""
    wall = statistics.median((x["tiles"] / x["wall"]) / (y["tiles"] / y["wall"]) for x, y in zip(a, b))
    cpu = statistics.median((x["tiles"] / x["cpu"]) / (y["tiles"] / y["cpu"]) for x, y in zip(a, b))
    return f"**{wall:.2f}** | **{cpu:.2f}**"


def table_rows(raw: dict) -> list[str]:
    name, timings, cos = raw["encoder"], raw["timings"], raw["cosine"]
    bare = [label for label in timings if label not in ("pipeline", "clam")]
    rows = [
        f"| {name} | bare: {label} | {summarise(timings[label])} | {cos[label][0]:.5f} / {cos[label][1]:.5f} |"
        for label in bare
    ]
    facts = raw["pipeline_facts"]
    waiting = facts["seconds"]["wait_for_tiles"] / facts["seconds"]["total"]
    rows.append(
        f"| {name} | **pipeline** ({facts['precision']}, {facts['optimize']}; {facts['n_tiles']} tiles, "
        f"{facts['workers']} reader; waited for tiles {waiting:.0%} of the loop) | {summarise(timings['pipeline'])} "
        f"| {cos['pipeline'][0]:.5f} / {cos['pipeline'][1]:.5f} (float16 on disk) |"
    )
    match = raw["pipeline_setting"]
    rows.append(f"| {name} | pipeline / bare {match} | {ratio(timings['pipeline'], timings[match])} | |")
    if timings["clam"]:
        rows.append(
            f"| {name} | CLAM-style loop (PIL + torchvision, fp32 NCHW) | {summarise(timings['clam'])} | |"
        )
        rows.append(f"| {name} | pipeline / CLAM-style | {ratio(timings['pipeline'], timings['clam'])} | |")
    for label in bare:
        if label.startswith(("bf16", "fp16")):
            rows.append(f"| {name} | {label} / fp32 plain | {ratio(timings[label], timings[bare[0]])} | |")
    cli = raw["cli"]
    rows.append(
        f"| {name} | `pathmil extract` command, one run: {cli['wall_s']:.1f} s wall including start-up and "
        f"model loading; its facts say {cli['tiles_per_second']:.1f} tiles/s | | | |"
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
    parser.add_argument("--repeats", type=int, default=3)
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
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_before = load()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        slide, all_tiles = make_slide(work)
        tiles = limit_tiles(all_tiles, args.max_tiles, work / "tiles.h5")
        raw = []
        for name in args.encoders:
            print(f"{name} ...", flush=True)
            raw.append(bench_encoder(name, slide, tiles, work, args))
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    header = [
        f"Feature extraction, {started}: {cpu_name()}, {os.cpu_count()} CPUs (torch capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_fast_bf16()}), GPU {gpu}, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{args.repeats} repeats; load average {load_before} before, {load()} after.",
        "",
        "| encoder | what | tiles/s wall: median (best) | tiles per CPU-second | cosine to fp32 plain: min / mean |",
        "|---|---|---|---|---|",
    ]
    table = "\n".join(header + [row for result in raw for row in table_rows(result)]) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps({"header": header[0], "results": raw}, indent=1))


if __name__ == "__main__":
    main()
