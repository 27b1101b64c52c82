# What the per-slide jobs ask SLURM for: a small model of their runtimes, and batches of slides that stay
# under slurm.max_runtime. Memory and the other rules' times are in the profile (workflow/profiles/slurm).
#
# A slide's tiles are estimated when the workflow parses (no slide is opened): from the file size, at
# TILES_PER_MB tissue tiles of 128 um per MB of a JPEG slide scanned at 0.5 um/px (fewer per MB when the
# table's mpp says it was scanned finer), scaled to the configured tile side and overlap; the demo's from its
# dimensions (its slides are painted later). Extraction then takes a start-up time plus, per tile, the reading
# (READ_SECONDS in one reading process, shared by the extract.workers processes) and the encoder (its GFLOP per
# tile, from the schema's facts, over the device's FLOP/s: GPU_FLOPS, or CPU_FLOPS per thread), unless
# slurm.seconds_per_tile gives the per-tile time. Every estimate is doubled (SAFETY) and rounded up to minutes.
import math

# CPU seconds to read, decode and resize one tile (benchmarks/RESULTS.md: 3 ms on 2 EPYC cores)
READ_SECONDS = 0.004
# encoder FLOP/s per CPU thread, fp32 (benchmarks/RESULTS.md: MobileNetV2 23e9, ResNet-50 trunc 61e9)
CPU_FLOPS = 20e9
# encoder FLOP/s of one GPU under bf16 autocast (a V100's order; an A100 or H100 does 2-6 times that)
GPU_FLOPS = 50e12
# tiles of 128 um per MB of a JPEG slide scanned at 0.5 um/px (cmu_small_region.svs, 1.9 MB: 45 in its
# whole grid, 23 with tissue)
TILES_PER_MB = 50
# tiling reads one low-resolution level and writes the QC picture (RESULTS.md: 0.45 s for 40,960 px)
TILE_SECONDS_PER_MB = 0.02
# interpreter, torch, encoder weights
START_SECONDS = {"tile": 30, "extract": 120}
SAFETY = 2
MAX_RUNTIME = round(config["slurm"]["max_runtime"] * 60)  # minutes


def file_mb(slide):
    """The slide file's size in MB (a missing file: 0, its job records the failure at once)."""
    path = SLIDES[slide]["path"]
    return os.path.getsize(path) / 1e6 if os.path.isfile(path) else 0.0


def estimated_tiles(slide, size_mb):
    """Tissue tiles of a slide, estimated without opening it (an upper bound for the demo)."""
    tile = config["tile"]
    stride_um = tile["target_mpp"] * tile["tile_px"] * (1 - tile["overlap"])
    if "demo" in config["slides"]:
        # the demo's size is at 0.5 um/px, whatever the scan
        height, width = config["slides"]["demo"]["size"]
        return math.ceil(height * 0.5 / stride_um) * math.ceil(width * 0.5 / stride_um)
    # an unknown scan resolution counts as many tiles per MB as 0.5 um/px
    scan_mpp = float(SLIDES[slide].get("mpp") or 0.5)
    return (
        size_mb
        * TILES_PER_MB
        * (min(scan_mpp, 0.5) / 0.5) ** 2
        * (128 / stride_um) ** 2
    )


def seconds_per_tile(settings):
    """Extraction seconds per tile of one encoder (its `extract` settings): reading plus the encoder on the
    job's device."""
    extract = {**config["extract"], **settings}
    if config["slurm"].get("seconds_per_tile"):
        return config["slurm"]["seconds_per_tile"]
    # a timm:<name> encoder counts as the most expensive registered one
    known = FACTS["encoder_gflops"]
    flops = known.get(extract["encoder"], max(known.values())) * 1e9
    gpu = extract["gpus"] > 0 and extract["device"] != "cpu"
    device_flops = GPU_FLOPS if gpu else CPU_FLOPS * extract["threads"]
    workers = extract.get("workers")
    # pathmil.features.extract.default_workers: threads - 1, at least 1, at most its cap on the device
    default = min(
        max(extract["threads"] - 1, 1),
        FACTS["max_default_readers"]["cuda" if gpu else "cpu"],
    )
    readers = default if workers is None else max(workers, 1)
    return READ_SECONDS / readers + flops / device_flops


def estimated_minutes():
    """Per slide: its estimated tiles, and the minutes of tiling and of extraction with each encoder
    (`extract/ENCODER`; `extract` their sum) of a first attempt."""
    per_tile = {e: seconds_per_tile(settings) for e, settings in ENCODERS.items()}
    estimates = {}
    for slide in SLIDES:
        # the demo's slides are painted by the workflow: estimated from their dimensions alone, so the
        # estimate (and the batches) are the same before and after they exist
        size_mb = 0.0 if "demo" in config["slides"] else file_mb(slide)
        tiles = estimated_tiles(slide, size_mb)
        tile = START_SECONDS["tile"] + size_mb * TILE_SECONDS_PER_MB
        need = {"tiles": round(tiles), "tile": math.ceil(SAFETY * tile / 60)}
        for encoder, seconds in per_tile.items():
            extract = START_SECONDS["extract"] + tiles * seconds
            need[f"extract/{encoder}"] = math.ceil(SAFETY * extract / 60)
        need["extract"] = sum(need[f"extract/{e}"] for e in per_tile)
        estimates[slide] = need
    return estimates


def batches_of_slides(minutes, budget):
    """Consecutive slides (cohort order) whose minutes add up to at most ``budget``; a slide that alone
    needs more gets a batch of its own."""
    batches, current, used = [], [], 0
    for slide, need in minutes.items():
        total = need["tile"] + need["extract"]
        if current and used + total > budget:
            batches.append(current)
            current, used = [], 0
        current.append(slide)
        used += total
    return batches + ([current] if current else [])


SLIDE_MINUTES = estimated_minutes()
# the batch's own record (rule batch), and what the batch's slides may ask for together
RECORD_MINUTES = 1
SLIDES_RUNTIME = MAX_RUNTIME - RECORD_MINUTES
BATCHES = batches_of_slides(SLIDE_MINUTES, SLIDES_RUNTIME // 2)
BATCH_OF = {slide: index for index, batch in enumerate(BATCHES) for slide in batch}
BATCH_MINUTES = [
    sum(SLIDE_MINUTES[s]["tile"] + SLIDE_MINUTES[s]["extract"] for s in batch)
    for batch in BATCHES
]
for _slide, _need in SLIDE_MINUTES.items():
    if _need["tile"] + _need["extract"] > MAX_RUNTIME:
        print(
            f"warning: slide {_slide} is estimated at {_need['tile'] + _need['extract']} min, more than "
            f"slurm.max_runtime ({MAX_RUNTIME} min); on SLURM its job asks for the maximum"
        )


def batch_group(index):
    """The SLURM job (group) of batch ``index``; none where jobs run on this machine, dry runs included.

    Snakemake ignores groups in local execution ("Group jobs: inactive"), but still forms them, in time
    that grows with the square of a group's jobs: a 10,000-slide dry run took 100 s with them, 53 s
    without (benchmarks/RESULTS.md, "Planning a large cohort"). A dry run therefore lists a batch's jobs
    one by one; its record (batches/N.tsv) lists the batch's slides and what they ask for.
    """
    return None if workflow.local_exec else f"slides_{index}"


def slide_group(wildcards):
    """The SLURM job (group) that tiles and extracts this slide: its batch's (see batch_group)."""
    return batch_group(BATCH_OF[wildcards.slide])


def slide_runtime(stage):
    """Minutes a tiling or extraction job asks for: its estimate times the attempt, but never more than its
    share of slurm.max_runtime in its batch (so a batch's jobs together, with the record, never ask for more).
    """

    def minutes(wildcards, attempt):
        key = f"extract/{wildcards.encoder}" if stage == "extract" else stage
        own = SLIDE_MINUTES[wildcards.slide][key]
        batch = BATCH_MINUTES[BATCH_OF[wildcards.slide]]
        return max(1, min(own * attempt, math.floor(own * SLIDES_RUNTIME / batch)))

    return minutes


def batch_record(index):
    """The batch's table: each slide's estimated tiles and the minutes its jobs ask for on a first attempt."""
    lines = ["slide_id\testimated_tiles\ttile_minutes\textract_minutes"]
    for slide in BATCHES[index]:
        need = SLIDE_MINUTES[slide]
        lines.append(f"{slide}\t{need['tiles']}\t{need['tile']}\t{need['extract']}")
    return "\n".join(lines) + "\n"
