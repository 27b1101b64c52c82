"""Stage 2: from a slide and its tiles file to a bag file of frozen-encoder features.

The loop keeps the encoder busy: DataLoader worker processes each open their own OpenSlide handle, read
tiles at the level and size the tiles file names, resize and crop them with OpenCV, and hand whole uint8
batches (B x H x W x 3) to the main process. There the batch is viewed as B x 3 x H x W (which *is* the
channels_last layout, so CNNs get it without a copy), normalised with two vectorised in-place ops, and
encoded under ``torch.inference_mode`` at the chosen precision. A tile whose compressed data is damaged is dropped,
counted and named; the slide goes on.

:func:`extract_slide` does one slide (skipping it when its bag already matches encoder, weights and tiles);
:func:`extract_cohort` loads the model once and runs many, recording failures in a table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from pathmil.batch import run_batch
from pathmil.device import autocast, resolve_device
from pathmil.errors import PathmilError, SlideError, UpstreamFailure
from pathmil.features.bagfile import read_bag_attrs, write_bag
from pathmil.features.encoders import (
    Encoder,
    Preprocess,
    create_encoder,
    encoder_spec,
    file_sha256,
    resolve_weights,
)
from pathmil.fileio import write_json
from pathmil.ids import slide_id_from_path
from pathmil.settings import Settings
from pathmil.slide.reader import Slide, resize, rgba_to_rgb
from pathmil.slide.tilefile import TileSet, read_tiles

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# -------------------------------------------------------------------------------------------- settings


class ExtractConfig(Settings):
    """How tiles become features: which frozen encoder, on what device, at what precision, into what file.

    ``precision="auto"`` picks the fastest setting that keeps features faithful (per-tile cosine similarity
    to fp32 of at least 0.999, benchmarks/RESULTS.md): the encoder's 16-bit autocast type (bf16; fp16 for
    MobileNetV2) on CUDA and on CPUs with native support (AMX, AVX-512 BF16), fp32 elsewhere (16-bit types
    are emulated there and several times slower). ``optimize="auto"`` fuses a CNN's layers for inference
    on CPU in fp32 (TorchScript freezing; oneDNN conv + batch-norm + ReLU fusion), exact up to rounding.
    """

    section = "extract"
    encoder: str = Field("resnet50_trunc", description="encoder: a registry name or timm:<model_name>")
    weights: str | None = Field(None, description="weights file; none: the Hugging Face or torch hub cache")
    random_init: bool = Field(
        False, description="random weights, for tests and baselines (recorded in the bag)"
    )
    batch_size: int = Field(64, ge=1, description="tiles per forward pass")
    workers: int | None = Field(
        None,
        ge=0,
        description=(
            "tile-reading processes; none: torch's threads - 1, from 1 to 8 (16 on a GPU); 0: main process"
        ),
    )
    prefetch: int = Field(4, ge=1, description="batches each reading process prepares ahead")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when a GPU is visible")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast type; auto: bf16 on CUDA and on CPUs with AMX/AVX-512 BF16, else fp32"
    )
    optimize: Literal["auto", "none", "jit", "compile"] = Field(
        "auto", description="auto: fused TorchScript for CNNs in fp32 on CPU, else none"
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="storage type of the features")
    overwrite: bool = Field(
        False, description="redo slides whose bag already matches encoder, weights and tiles"
    )

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, name: str) -> str:
        try:
            encoder_spec(name)
        except PathmilError as err:  # names the registered encoders
            raise ValueError(str(err)) from None
        return name

    @model_validator(mode="after")
    def _weights_or_random(self) -> ExtractConfig:
        if self.random_init and self.weights:
            raise ValueError("give either weights (--weights) or random_init (--random-init), not both")
        return self


# ------------------------------------------------------------------------------ device and precision


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AMX or AVX-512 BF16); elsewhere bf16 is emulated."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(requested: str, device: torch.device, half: str = "bf16") -> str:
    """``auto``: the encoder's faithful 16-bit type (``half``, bf16 for most) where the hardware runs it
    natively, else fp32.

    On CUDA that is ``half`` (fp16 on GPUs without bf16). On a CPU, bf16 needs AMX or AVX-512 BF16 and fp16
    needs AMX-FP16; elsewhere (e.g. AMD Zen 3, AVX2 only) 16-bit types are emulated and several times slower
    than fp32 (benchmarks/RESULTS.md), so fp32 is the fastest faithful setting there.
    """
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if half == "bf16" and torch.cuda.is_bf16_supported() else "fp16"
    if half == "bf16":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp16" if getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)() else "fp32"


def resolve_optimize(requested: str, device: torch.device, precision: str, encoder: Encoder) -> str:
    """``auto``: TorchScript freezing for CNNs in fp32 on CPU (oneDNN fuses conv, batch norm and ReLU and
    keeps weights pre-packed), nothing elsewhere. ``compile`` runs about as fast on CPU but takes 10-60 s
    to start per process (benchmarks/RESULTS.md), so it is offered, never chosen."""
    if requested != "auto":
        return requested
    return "jit" if device.type == "cpu" and precision == "fp32" and encoder.convolutional else "none"


MAX_DEFAULT_READERS = {"cpu": 8, "cuda": 16}


def default_workers(device: torch.device) -> int:
    """One tile reader per compute thread but one (the main process runs the encoder), at least 1 and at
    most ``MAX_DEFAULT_READERS``: 8 on a CPU, where the readers share the cores with the encoder, 16 on a
    GPU, where they set the pace (H200: 15 readers read 36-43 % more tiles per second than 8,
    benchmarks/RESULTS.md; more were not measured, and each holds ``prefetch`` batches in shared memory).

    Counting torch's threads rather than the machine's cores keeps a job inside its allocation when the
    workflow caps threads (``pathmil --threads N``).
    """
    cap = MAX_DEFAULT_READERS["cuda" if device.type == "cuda" else "cpu"]
    return max(1, min(cap, torch.get_num_threads() - 1))


# ------------------------------------------------------------------------------------------ runner


class EncoderRunner:
    """An encoder placed on a device, at a precision, optionally fused: uint8 tiles in, float32 features out.

    ``channels_last`` defaults to True for CNNs (oneDNN and cuDNN run NHWC convolutions faster); the
    benchmark turns it off to measure the plain layout.
    """

    def __init__(
        self,
        encoder: Encoder,
        device: torch.device,
        precision: str,
        optimize: str = "none",
        channels_last: bool | None = None,
    ):
        self.encoder = encoder
        self.device = device
        self.precision = precision
        self.optimize = optimize
        self.channels_last = encoder.convolutional if channels_last is None else channels_last
        model = encoder.model.to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        mean = torch.tensor(encoder.preprocess.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(encoder.preprocess.std, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)  # (x / 255 - mean) / std as one multiply-add
        self.shift = mean / std
        self.model = self._optimised(model, optimize)

    def _optimised(self, model: torch.nn.Module, optimize: str) -> torch.nn.Module:
        if optimize == "none":
            return model
        if self.precision != "fp32":
            raise PathmilError(f"--optimize {optimize} works with --precision fp32 only")
        side = self.encoder.preprocess.input_px
        example = self.normalise(torch.zeros(2, side, side, 3, dtype=torch.uint8))
        if optimize == "compile":
            return torch.compile(model, dynamic=False, options={"freezing": True})
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.compile
                # check_trace=False: its re-run and comparison cost about 1 s per process; the traced
                # model's features are compared with the eager model's in tests/test_features.py
                traced = torch.jit.trace(model, example, check_trace=False)
                return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        except Exception as err:  # an architecture TorchScript cannot trace still runs, unfused
            log.warning("TorchScript fusion of %s failed (%s); running it eagerly", self.encoder.name, err)
            self.optimize = "none"
            return model

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """B x H x W x 3 uint8 -> B x 3 x H x W float, normalised; NHWC memory is channels_last already."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.mul_(self.scale).sub_(self.shift)
        return x if self.channels_last else x.contiguous()

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features of normalised images (on the device), in float32 on the device."""
        with autocast(self.device, AUTOCAST_DTYPES.get(self.precision)):
            return self.model(x).float()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of B x H x W x 3 uint8 tiles, in float32 on the CPU."""
        return self.encode(self.normalise(images)).cpu()


# ------------------------------------------------------------------------------------------ reading


def _init_worker(_: int) -> None:
    """Readers use one thread each, so they never compete with the encoder's threads."""
    torch.set_num_threads(1)


@contextlib.contextmanager
def _fork_safe_opencv() -> Iterator[None]:
    """Shrink OpenCV's thread pool to one thread while reader processes are forked, then restore it.

    A forked child inherits OpenCV's pool bookkeeping but not its threads, and hangs on its first parallel
    call or pool change; with one thread in the parent at fork time the children never touch a pool.
    """
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


class TileBatches(Dataset):
    """Batches of tiles from one slide: ``dataset[[i, j, ...]]`` -> (images, kept indices, failures).

    Each process opens its own OpenSlide handle (handles are not shareable across processes). A read that
    fails (damaged JPEG data) drops that tile; the handle is reopened because OpenSlide refuses every
    later call on a handle once it has reported an error.
    """

    def __init__(
        self,
        slide_path: str | os.PathLike,
        slide_id: str,
        slide_mpp: tuple[float, float] | None,
        tiles: TileSet,
        preprocess: Preprocess,
    ):
        self.slide_path = Path(slide_path)
        self.slide_id = slide_id
        self.slide_mpp = slide_mpp
        self.coords = tiles.coords
        self.level = tiles.level
        self.read_size = tiles.read_size
        self.preprocess = preprocess
        self._slide: Slide | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.coords)

    def _handle(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = Slide(self.slide_path, self.slide_id, mpp=self.slide_mpp, mpp_source="tiles")
            self._pid = os.getpid()
        return self._slide

    def _reopen(self) -> None:
        if self._slide is not None:
            self._slide.close()
        self._slide = None

    def read(self, index: int) -> np.ndarray:
        """One tile as the encoder sees it: read, resized to ``resize_px``, centre-cropped to ``input_px``.

        Opaque tiles (nearly all) are resized in OpenSlide's RGBA and the alpha dropped afterwards, which
        saves a full-size copy; tiles touching transparent areas (sparse scans, and the part of a tile
        beyond the slide's right or bottom edge) are composited on white first, as tiling and heatmaps do.
        A non-square read (non-square pixels) is resized to a square.
        """
        import openslide

        x, y = (int(v) for v in self.coords[index])
        try:
            rgba = np.asarray(self._handle().handle.read_region((x, y), self.level, self.read_size))
        except openslide.OpenSlideError as err:
            raise SlideError(
                self.slide_id, f"cannot read region ({x}, {y}) at level {self.level}: {err}"
            ) from None
        tile = resize(rgba if rgba[..., 3].min() == 255 else rgba_to_rgb(rgba), self.preprocess.resize_px)
        start = (self.preprocess.resize_px - self.preprocess.input_px) // 2
        stop = start + self.preprocess.input_px
        return tile[start:stop, start:stop, :3]

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
        side = self.preprocess.input_px
        images = np.empty((len(indices), side, side, 3), np.uint8)
        kept: list[int] = []
        failed: list[tuple[int, str]] = []
        for index in indices:
            try:
                images[len(kept)] = self.read(index)
                kept.append(index)
            except SlideError as err:
                failed.append((int(index), err.cause))
                self._reopen()
        return torch.from_numpy(images[: len(kept)]), torch.tensor(kept, dtype=torch.int64), failed


# --------------------------------------------------------------------------------------------- loop


@dataclass
class TileFeatures:
    """The features of the tiles that could be read, and the tiles that could not."""

    features: np.ndarray  # K x D
    kept: np.ndarray  # K indices into the tiles file
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, error)
    seconds: dict[str, float] = field(default_factory=dict)
    workers: int = 0  # the reading processes that ran


def encode_tiles(
    runner: EncoderRunner,
    dataset: TileBatches,
    batch_size: int,
    workers: int,
    prefetch: int = 4,
    progress: bool = False,
    dtype: str = "float32",
) -> TileFeatures:
    """Run every tile of ``dataset`` through ``runner``; reading overlaps encoding when ``workers`` > 0.

    No more readers start than there are batches (a slide of 132 tiles at batch 64 starts 3, not 8): each
    costs a fork and a slide handle. Features are kept in ``dtype`` as they arrive (100,000 tiles of a
    2560-d encoder are 1 GB in float32). ``seconds`` holds the loop's ``total``, its ``wait_for_tiles``
    and ``encode`` time, and ``first_round``: from the loop's start until every reader has delivered its
    first batch (their start-up and first reads, all at once). The rest of the tiles over the rest of the
    time is the rate a slide of tens of thousands of tiles sees; on a small slide the first round is
    most of the time.
    """
    from tqdm import tqdm

    n = len(dataset)
    workers = min(workers, readers_needed(n, batch_size))
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=BatchSampler(SequentialSampler(range(n)), batch_size, drop_last=False),
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        pin_memory=runner.device.type == "cuda",
        worker_init_fn=_init_worker if workers else None,
    )
    dim = runner.encoder.dim
    features = np.zeros((n, dim), dtype)
    kept = np.zeros(n, bool)
    failed: list[tuple[int, str]] = []
    waited = encoding = 0.0
    first_round = None
    delivered = 0
    start = time.perf_counter()
    with (
        _fork_safe_opencv() if workers else contextlib.nullcontext(),
        tqdm(total=n, desc=dataset.slide_id, unit="tile", disable=not progress, leave=False) as bar,
    ):
        batches = iter(loader)
        while True:
            tick = time.perf_counter()
            try:
                images, index, bad = next(batches)
            except StopIteration:
                break
            waited += time.perf_counter() - tick
            tick = time.perf_counter()
            delivered += 1
            if first_round is None and delivered >= max(workers, 1):
                first_round = tick - start
            if len(index):
                out = _padded_call(runner, images, batch_size)
                if out.shape != (len(index), dim):
                    raise RuntimeError(
                        f"encoder {runner.encoder.name} gave {tuple(out.shape)}, not N x {dim}"
                    )
                features[index.numpy()] = out.numpy()
                kept[index.numpy()] = True
            encoding += time.perf_counter() - tick
            failed += [(int(i), str(msg)) for i, msg in bad]
            bar.update(len(index) + len(bad))
    seconds = {
        "total": time.perf_counter() - start,
        "wait_for_tiles": waited,
        "encode": encoding,
        "first_round": first_round or 0.0,
    }
    order = np.flatnonzero(kept)
    features = features if len(order) == n else features[order]
    seconds = {k: round(v, 4) for k, v in seconds.items()}
    return TileFeatures(features, order, sorted(failed), seconds, workers)


def readers_needed(n_tiles: int, batch_size: int) -> int:
    """The number of batches: more reading processes than that would have nothing to read."""
    return max(1, -(-n_tiles // batch_size))


def _padded_call(runner: EncoderRunner, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Pad a short batch (a slide's last) to the batch size, on the device, where a new input shape costs
    more than the padding: a compiled model recompiles for it, and on CUDA each slide's last batch, of
    another size each, cost about a second (MobileNetV2 fp16 at batch 64 on an H200, 2026-11-30;
    benchmarks/RESULTS.md). The padding's features are dropped."""
    fixed_shape = runner.optimize == "compile" or runner.device.type == "cuda"
    if not fixed_shape or len(images) == batch_size:
        return runner(images)
    x = runner.normalise(images)
    full = x.new_zeros((batch_size, *x.shape[1:]))
    if runner.channels_last:
        full = full.contiguous(memory_format=torch.channels_last)
    full[: len(x)] = x
    return runner.encode(full)[: len(x)].cpu()


# -------------------------------------------------------------------------------------- extractor


class FeatureExtractor:
    """An encoder configured once and reused for many slides; the network is built on first use, so a run
    whose slides are all done already never loads it."""

    def __init__(self, config: ExtractConfig):
        self.config = config
        self.device = resolve_device(config.device)
        spec = encoder_spec(config.encoder)
        self.dim = spec.dim
        self.preprocess = spec.preprocess
        if config.random_init:
            self.weights_path, self.weights_sha256 = None, ""
        else:
            self.weights_path = resolve_weights(config.encoder, spec, config.weights)
            self.weights_sha256 = file_sha256(self.weights_path)
        self._runner: EncoderRunner | None = None

    @property
    def identity(self) -> dict[str, Any]:
        """What a bag must match to be reused: encoder, weights and the random-init flag."""
        return {
            "encoder": self.config.encoder,
            "encoder_weights_sha256": self.weights_sha256,
            "random_init": self.config.random_init,
        }

    @property
    def runner(self) -> EncoderRunner:
        if self._runner is None:
            encoder = create_encoder(
                self.config.encoder,
                weights=self.weights_path,
                random_init=self.config.random_init,
                sha256=self.weights_sha256 or None,
            )
            precision = resolve_precision(self.config.precision, self.device, encoder.half)
            optimize = resolve_optimize(self.config.optimize, self.device, precision, encoder)
            self._runner = EncoderRunner(encoder, self.device, precision, optimize)
            log.info(
                "encoder %s (%d-d) on %s, precision %s, optimize %s",
                encoder.name,
                encoder.dim,
                self.device,
                precision,
                optimize,
            )
        return self._runner

    @property
    def workers(self) -> int:
        return default_workers(self.device) if self.config.workers is None else self.config.workers


def tiles_sha256(tiles: TileSet) -> str:
    """A fingerprint of what will be read: the coordinates and the read geometry (not the file's bytes)."""
    geometry = {k: tiles.coords_attrs.get(k) for k in ("patch_size", "patch_level", "tile_px", "target_mpp")}
    geometry["read_size"] = list(tiles.read_size)
    digest = hashlib.sha256(np.ascontiguousarray(tiles.coords, dtype=np.int64).tobytes())
    digest.update(json.dumps(geometry, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def load_tiles_for(tiles_path: str | os.PathLike) -> TileSet:
    """Read a tiles file; if tiling failed for this slide (its facts JSON says so), re-raise that failure."""
    tiles_path = Path(tiles_path)
    facts_path = tiles_path.with_suffix(".json")
    if not tiles_path.is_file() and facts_path.is_file():
        try:
            facts = json.loads(facts_path.read_text())
        except (OSError, json.JSONDecodeError):
            facts = {}
        if facts.get("status") == "failed":
            raise UpstreamFailure(str(facts.get("error", "failed")), str(facts.get("stage", "tile")))
    return read_tiles(tiles_path)


def bag_is_current(out: str | os.PathLike, identity: dict[str, Any]) -> bool:
    """True when ``out`` is a finished bag made with the same encoder, weights and tiles of the same slide
    file (``identity``: the attributes that must match)."""
    out = Path(out)
    if not out.is_file():
        return False
    try:
        attrs = read_bag_attrs(out)
    except PathmilError:  # empty, truncated or damaged: extract again
        return False
    return all(attrs.get(key) == value for key, value in identity.items())


def extract_slide(
    slide_path: str | os.PathLike,
    tiles_path: str | os.PathLike,
    out: str | os.PathLike,
    extractor: FeatureExtractor,
    slide_id: str | None = None,
    facts: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Extract one slide into bag ``out`` and its facts JSON (default: ``out`` with .json).

    Skips the work (``skipped: True``) when ``out`` already matches encoder, weights and tiles, unless the
    config says ``overwrite``. Nothing is written when the slide fails.
    """
    start = time.perf_counter()
    out = Path(out)
    facts_path = Path(facts) if facts is not None else out.with_suffix(".json")
    tiles = load_tiles_for(tiles_path)
    slide_id = slide_id or str(tiles.attrs.get("slide_id") or slide_id_from_path(slide_path))
    # the slide file is checked before a finished bag is kept: a bag of the same id and tiles made from
    # another file (a re-scan of the same size) would otherwise stand in for it
    with Slide(slide_path, slide_id, mpp=tiles.slide_mpp, mpp_source="tiles") as slide:
        _check_tiles_match(slide, tiles, tiles_path)
        dimensions, slide_mpp, quickhash = slide.dimensions, slide.mpp_xy, slide.quickhash
    identity = {**extractor.identity, "tiles_sha256": tiles_sha256(tiles)}
    if quickhash:
        identity["slide_quickhash"] = quickhash
    config = extractor.config
    if not config.overwrite and bag_is_current(out, identity):
        return _skipped_facts(out, facts_path, slide_id)
    if len(tiles.coords) == 0:
        raise SlideError(slide_id, f"tiles file {tiles_path} holds no tiles; tile the slide again")
    runner = extractor.runner
    dataset = TileBatches(slide_path, slide_id, slide_mpp, tiles, extractor.preprocess)
    result = encode_tiles(
        runner, dataset, config.batch_size, extractor.workers, config.prefetch, progress, config.dtype
    )
    if len(result.kept) == 0:
        raise SlideError(
            slide_id,
            f"none of its {len(tiles.coords)} tiles could be read (first error: {result.failed[0][1]}); "
            "the file is damaged: copy or scan it again",
        )
    _check_finite(slide_id, result.features, runner.precision, config.dtype)
    failed_coords = tiles.coords[[i for i, _ in result.failed]].reshape(-1, 2).astype(np.int64)
    warnings_list = _failure_warnings(slide_id, len(tiles.coords), failed_coords, result.failed)
    # what is known about this bag, written once: the HDF5 attributes and the facts JSON come from it
    record = {
        **identity,
        "slide_id": slide_id,
        "slide_path": str(slide_path),
        "encoder_dim": runner.encoder.dim,
        "device": str(runner.device),
        "precision": runner.precision,
        "optimize": runner.optimize,
        "n_tiles": len(result.kept),
        "n_failed_tiles": len(failed_coords),
    }
    attrs = {
        **record,
        "tiles_path": str(tiles_path),
        "encoder_weights": str(extractor.weights_path or ""),
        "input_px": extractor.preprocess.input_px,
        "resize_px": extractor.preprocess.resize_px,
        "tile_px": tiles.tile_px,
        "target_mpp": tiles.coords_attrs.get("target_mpp"),
        "slide_mpp": sum(slide_mpp) / 2,
        "slide_mpp_x": slide_mpp[0],
        "slide_mpp_y": slide_mpp[1],
        "slide_quickhash": quickhash,
        "level0_size": np.asarray(dimensions, np.int64),
        "dtype": config.dtype,
        "failed_tile_coords": failed_coords,
        "tiling": tiles.attrs.get("tiling"),  # the tiling settings (JSON), when pathmil made the tiles
    }
    extra = {}
    if tiles.tissue_fraction is not None:
        extra["tissue_fraction"] = tiles.tissue_fraction[result.kept].astype(np.float32)
    write_start = time.perf_counter()
    write_bag(out, result.features, tiles.coords[result.kept], tiles.coords_attrs, attrs, extra=extra)
    seconds = {**result.seconds, "write": round(time.perf_counter() - write_start, 4)}
    seconds["all"] = round(time.perf_counter() - start, 4)
    facts_data = {
        **record,
        "path": record["slide_path"],
        "status": "ok",
        "skipped": False,
        "out": str(out),
        "dim": record["encoder_dim"],
        "n_failed": record["n_failed_tiles"],
        "failed_tile_coords": failed_coords.tolist(),
        "seconds": seconds,
        "tiles_per_second": round(len(tiles.coords) / max(result.seconds["total"], 1e-9), 2),
        "workers": result.workers,
        "batch_size": config.batch_size,
        "warnings": warnings_list,
    }
    write_json(facts_path, facts_data)
    return facts_data


def _check_finite(slide_id: str, features: np.ndarray, precision: str, dtype: str) -> None:
    """Refuse features with NaN or inf (an encoder that overflows in half precision, or float16 storage of
    values beyond its range): readers refuse such bags, so none is written.

    Raises:
        SlideError: naming how many tiles and what to change.
    """
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise SlideError(
            slide_id,
            f"the encoder gave NaN or inf features for {int(bad.sum())} of {len(features)} tiles (precision "
            f"{precision}, stored as {dtype}); extract it with --precision fp32 (pathmil holds features as "
            "float16: values beyond 65504 cannot be used)",
        )


def _failure_warnings(
    slide_id: str, n_tiles: int, failed_coords: np.ndarray, failed: list[tuple[int, str]]
) -> list[str]:
    """One warning naming the dropped tiles (the first ten) and the first error, also logged."""
    if not len(failed_coords):
        return []
    shown = ", ".join(f"({x}, {y})" for x, y in failed_coords[:10])
    more = f" and {len(failed_coords) - 10} more" if len(failed_coords) > 10 else ""
    warning = (
        f"dropped {len(failed_coords)} of {n_tiles} tiles that could not be read "
        f"(level-0 x, y: {shown}{more}); first error: {failed[0][1]}"
    )
    log.warning("%s: %s", slide_id, warning)
    return [warning]


def _check_tiles_match(slide: Slide, tiles: TileSet, tiles_path: str | os.PathLike) -> None:
    """A tiles file made for another slide would read the wrong pixels: refuse it (its level-0 size or
    OpenSlide's fingerprint of the slide differ)."""
    width, height = tiles.coords_attrs.get("level0_width"), tiles.coords_attrs.get("level0_height")
    if width is not None and height is not None and (int(width), int(height)) != tuple(slide.dimensions):
        raise SlideError(
            slide.slide_id,
            f"tiles file {tiles_path} was made for a {width}x{height} slide, but {slide.path.name} is "
            f"{slide.dimensions[0]}x{slide.dimensions[1]}; tile this slide again",
        )
    if slide.is_other_file_than(tiles.attrs.get("slide_quickhash")):
        raise SlideError(
            slide.slide_id,
            f"tiles file {tiles_path} was made from another file than {slide.path.name} (its slide "
            "fingerprint, openslide.quickhash-1, differs); tile this slide again",
        )
    if tiles.level >= len(slide.level_dimensions):
        raise SlideError(slide.slide_id, f"tiles file {tiles_path} reads level {tiles.level}, which it lacks")


def _skipped_facts(out: Path, facts_path: Path, slide_id: str) -> dict[str, Any]:
    """The facts of a slide whose bag is already current; the facts file is kept when it exists."""
    if facts_path.is_file():
        try:
            return {**json.loads(facts_path.read_text()), "skipped": True}
        except (OSError, json.JSONDecodeError):
            pass
    attrs = read_bag_attrs(out)
    facts = {
        "slide_id": slide_id,
        "path": attrs.get("slide_path"),
        "status": "ok",
        "skipped": True,
        "out": str(out),
        "encoder": attrs.get("encoder"),
        "n_tiles": int(attrs.get("n_tiles", 0)),
        "n_failed": int(attrs.get("n_failed_tiles", 0)),
        "precision": attrs.get("precision"),
        "device": attrs.get("device"),
    }
    write_json(facts_path, facts)
    return facts


def extract_cohort(
    slides: pd.DataFrame,
    tiles_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: ExtractConfig,
    skip_errors: bool = False,
    failures: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Extract every slide of a table (``slide_id``, ``path``) with one encoder loaded once.

    Tiles come from ``tiles_dir/{slide_id}.h5``, bags go to ``out_dir/{slide_id}.h5`` (facts beside them).
    With ``skip_errors`` a failing slide is recorded (slide, path, stage, error) in the failures table
    (default ``out_dir/failures.csv``, always written) and the rest go on. Returns the facts of each slide.
    """
    out_dir = Path(out_dir)
    extractor = FeatureExtractor(config)

    def work(row: Any) -> dict[str, Any]:
        tiles = Path(tiles_dir) / f"{row.slide_id}.h5"
        return extract_slide(
            row.path, tiles, out_dir / f"{row.slide_id}.h5", extractor, slide_id=row.slide_id
        )

    failures_path = Path(failures) if failures else out_dir / "failures.csv"
    records = run_batch(slides.itertuples(index=False), work, "extract", failures_path, skip_errors, progress)
    return pd.DataFrame(records)
