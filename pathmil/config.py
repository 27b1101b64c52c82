"""Typed settings of every stage, with their defaults: the only place a default lives.

Each stage has a dataclass. Values come, in order of precedence, from the dataclass defaults, a YAML file
(``--config``), and ``--set key=value`` overrides with dotted keys (``--set tissue.sthresh=15``). Unknown
keys are refused with the list of allowed ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pathmil.errors import PathmilError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------- tiling


@dataclasses.dataclass
class TissueConfig:
    """Tissue segmentation parameters, with CLAM's names (Lu et al., Nat. Biomed. Eng. 2021).

    Areas ``a_t`` and ``a_h`` count reference patches of 512 x 512 level-0 pixels, as CLAM does.
    """

    sthresh: int = 8  # saturation threshold (0-255) when Otsu is off
    sthresh_up: int = 255  # value written for tissue in the binary mask
    mthresh: int = 7  # median blur kernel size (odd)
    close: int = 4  # side of the square closing kernel, in segmentation-level pixels; 0 turns it off
    use_otsu: bool = False  # Otsu's threshold on the blurred saturation instead of sthresh
    a_t: float = 16  # minimum tissue area (minus holes) of a kept contour, in reference patches
    a_h: float = 4  # minimum area of a kept hole, in reference patches
    max_n_holes: int = 8  # keep at most this many (largest) holes per tissue contour
    seg_downsample: float = 64  # segment at the pyramid level closest to this downsample
    remove_artifacts: bool = False  # drop pen marks (blue, green, black ink) and black borders


TISSUE_PRESETS: dict[str, TissueConfig] = {
    "tcga": TissueConfig(sthresh=8, mthresh=7, close=4, a_t=16, a_h=4, max_n_holes=8),
    "bwh_biopsy": TissueConfig(sthresh=15, mthresh=11, close=2, a_t=1, a_h=1, max_n_holes=2),
    "bwh_resection": TissueConfig(sthresh=15, mthresh=11, close=4, a_t=100, a_h=16, max_n_holes=8),
}


@dataclasses.dataclass
class TileConfig:
    """How a slide becomes a grid of tiles: a physical tile size and a tissue filter."""

    target_mpp: float = 0.5  # um per pixel of the tiles
    tile_px: int = 256  # tile side in pixels at target_mpp
    overlap: float = 0.0  # fraction of a tile shared with its neighbour, in [0, 1)
    min_tissue: float = 0.25  # keep tiles whose tissue fraction is at least this
    preset: str = "tcga"  # tissue segmentation preset: tcga, bwh_biopsy or bwh_resection
    tissue: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the preset's values
    default_mpp: float | None = None  # um/px for slides whose metadata and table give none
    qc_max_px: int = 2048  # longest side of the QC picture

    def tissue_params(self) -> TissueConfig:
        """The preset's segmentation parameters with this config's overrides applied."""
        if self.preset not in TISSUE_PRESETS:
            raise PathmilError(
                f"unknown tissue preset '{self.preset}'; choose one of {sorted(TISSUE_PRESETS)}"
            )
        base = dataclasses.asdict(TISSUE_PRESETS[self.preset])
        return from_dict(TissueConfig, {**base, **self.tissue}, where="tile.tissue")

    def validate(self) -> None:
        """Refuse settings that cannot make a tile grid."""
        if not self.target_mpp > 0:
            raise PathmilError(f"target_mpp must be positive, got {self.target_mpp}")
        if self.tile_px < 8:
            raise PathmilError(f"tile_px must be at least 8, got {self.tile_px}")
        if not 0 <= self.overlap < 1:
            raise PathmilError(f"overlap must be in [0, 1), got {self.overlap}")
        if not 0 <= self.min_tissue <= 1:
            raise PathmilError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        self.tissue_params()


# ---------------------------------------------------------------------------------- feature extraction

EXTRACT_DEVICES = ("auto", "cpu", "cuda")
EXTRACT_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EXTRACT_DTYPES = ("float16", "float32")
EXTRACT_OPTIMIZE = ("auto", "none", "jit", "compile")


@dataclasses.dataclass
class ExtractConfig:
    """How tiles become features: which frozen encoder, on what device, at what precision, into what file.

    ``precision="auto"`` picks the fastest setting that keeps features faithful (per-tile cosine similarity
    to fp32 of at least 0.999, benchmarks/RESULTS.md): the encoder's 16-bit autocast type (bf16; fp16 for
    MobileNetV2) on CUDA and on CPUs with native support (AMX, AVX-512 BF16), fp32 elsewhere (16-bit types
    are emulated there and several times slower). ``optimize="auto"``
    fuses a CNN's layers for inference on CPU in fp32 (TorchScript freezing; oneDNN conv + batch-norm +
    ReLU fusion), which is exact up to float rounding.
    """

    encoder: str = "resnet50_trunc"  # registry name or timm:<model_name>
    weights: str | None = None  # weights file; None: the Hugging Face or torch hub cache
    random_init: bool = False  # random weights, for tests and baselines only (recorded in the bag)
    batch_size: int = 64
    workers: int | None = None  # tile-reading processes; None: torch's threads - 1, from 1 to 8
    prefetch: int = 4  # batches each reading process prepares ahead
    device: str = "auto"  # auto (cuda when available), cpu or cuda
    precision: str = "auto"  # auto, fp32, bf16 or fp16 (autocast)
    optimize: str = "auto"  # auto, none, jit (TorchScript freeze) or compile (torch.compile, slow start)
    dtype: str = "float16"  # features on disk: float16 or float32
    overwrite: bool = False  # redo slides whose bag already matches encoder, weights and tiles

    def validate(self) -> None:
        """Refuse settings the extraction loop cannot honour."""
        for name, allowed in (
            ("device", EXTRACT_DEVICES),
            ("precision", EXTRACT_PRECISIONS),
            ("dtype", EXTRACT_DTYPES),
            ("optimize", EXTRACT_OPTIMIZE),
        ):
            if getattr(self, name) not in allowed:
                raise PathmilError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        if self.batch_size < 1:
            raise PathmilError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise PathmilError(f"workers must be 0 (read in the main process) or more, got {self.workers}")
        if self.prefetch < 1:
            raise PathmilError(f"prefetch must be at least 1, got {self.prefetch}")
        if self.random_init and self.weights:
            raise PathmilError("give either weights (--weights) or random_init (--random-init), not both")


# ------------------------------------------------------------------------------------------- mambamil


MAMBA_VARIANTS = ("sr", "plain", "bi")


@dataclasses.dataclass
class MambaMILConfig:
    """MambaMIL's settings (Yang et al., MICCAI 2024): the ``model`` section for ``--aggregator mambamil``.

    The defaults are the paper's; the authors' scripts use ``sr_rate: 5``.
    """

    d_model: int = 512  # width after the input projection
    n_layers: int = 2  # Mamba layers, each h <- h + block(LayerNorm(h))
    d_state: int = 16  # state size per channel of the selective scan
    d_conv: int = 4  # width of the causal depthwise convolution
    expand: int = 2  # d_inner = expand * d_model
    dropout: float = 0.25  # after the input projection
    variant: str = "sr"  # sr (SR-Mamba), plain (Mamba) or bi (bidirectional Mamba)
    sr_rate: int = 10  # SR-Mamba's reordering stride R
    token_reorder: bool = False  # each layer scans its tokens softly sorted by learned importance (Vo et al.)
    reorder_tau: float = 1.0  # SoftSort temperature of token_reorder (-> 0: a hard sort)
    reorder_window: int = 64  # SoftSort mixes tokens within this many ranks (exact for bags up to window + 1)
    positive_definite: bool = False  # S_B = diag(softplus(s)) S_C, so S_C^T S_B >= 0 (Vo et al., ICLR 2025)
    attn_dim: int = 128  # hidden size of the attention pooling
    backend: str = "auto"  # selective scan: auto (mamba-ssm kernels on a GPU if installed), torch, cuda

    def validate(self) -> None:
        """Refuse settings that cannot build the model."""
        if self.variant not in MAMBA_VARIANTS:
            raise PathmilError(
                f"model.variant '{self.variant}' unknown; choose one of {', '.join(MAMBA_VARIANTS)}"
            )
        sizes = ("d_model", "n_layers", "d_state", "d_conv", "expand", "sr_rate", "attn_dim")
        for name in (*sizes, "reorder_window"):
            if getattr(self, name) < 1:
                raise PathmilError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise PathmilError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.reorder_tau > 0:
            raise PathmilError(f"model.reorder_tau must be positive, got {self.reorder_tau}")
        if self.backend not in ("auto", "torch", "cuda"):
            raise PathmilError(f"model.backend '{self.backend}' unknown; choose auto, torch or cuda")


# ------------------------------------------------------------------------------------------ machinery


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) dict, refusing unknown keys and wrong types."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PathmilError(f"unknown setting {where}.{unknown[0]}; allowed: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting where YAML is looser than Python (int -> float)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise PathmilError(f"setting {where} must be a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except PathmilError as err:
                errors.append(str(err))
        raise PathmilError(errors[0] if errors else f"setting {where}: bad value {value!r}")
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise PathmilError(f"setting {where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PathmilError(f"setting {where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as text
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise PathmilError(f"setting {where} must be true or false, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise PathmilError(f"setting {where} must be {hint.__name__}, got {value!r}")
    return value


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise PathmilError(f"--set expects key=value, got '{pair}'")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``update``, merging nested mappings key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a clear error."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise PathmilError(f"config file {path} must hold a mapping of settings")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    section: str | None = None,
    **explicit: Any,
) -> T:
    """Defaults, then the YAML file (its ``section`` if named), then ``--set`` overrides, then ``explicit``.

    ``explicit`` holds values given as dedicated command-line flags; ``None`` means the flag was not given.
    """
    data = read_yaml(path)
    if section is not None:
        data = data.get(section, {}) or {}
    data = deep_merge(data, parse_overrides(overrides))
    data = deep_merge(data, {k: v for k, v in explicit.items() if v is not None})
    return from_dict(cls, data, where=section or "config")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain data, for checkpoints and provenance."""
    return dataclasses.asdict(config)


# ------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class SplitConfig:
    """Patient-level cross-validation: K folds, each with a validation part for early stopping."""

    folds: int = 5
    val_frac: float = 0.15  # of each fold's training patients, held out for early stopping
    test_frac: float | None = None  # a fixed test set held out of every fold (None: test = the fold held out)
    seed: int = 0


@dataclasses.dataclass
class TrainConfig:
    """One training run: task, aggregator and the explicit loop's settings (saved in every checkpoint)."""

    task: str = "classification"  # classification, survival or regression
    target: list[str] | None = None  # label column(s); default label | time, event | stil
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # loss, n_bins, class_weights...
    aggregator: str = "abmil"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # the aggregator's settings
    mhim: dict[str, Any] = dataclasses.field(default_factory=dict)  # MHIM-MIL settings (mhim_* aggregators)
    bag_level: str = "patient"  # patient: a patient's slides joined into one bag; slide: one bag per slide
    max_instances: int | None = None  # sample at most this many instances per bag in training
    optimizer: str = "adamw"  # adam or adamw
    lr: float = 2e-4
    weight_decay: float = 1e-5
    epochs: int = 50
    min_epochs: int = 10  # no early stop before this many epochs
    patience: int = 10  # epochs without improvement of the task's main metric on validation
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to zero
    accumulation: int = 1  # bags per optimiser step (and per Cox loss)
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"  # auto, cpu or cuda
    amp: bool = True  # bf16 autocast on CUDA (CPU always float32)
    memory_budget_gb: float = 8.0  # keep all bags in memory when they fit in this much

    def validate(self) -> None:
        if self.task not in ("classification", "survival", "regression"):
            raise PathmilError(f"unknown task '{self.task}'; choose classification, survival or regression")
        if self.bag_level not in ("patient", "slide"):
            raise PathmilError(f"bag_level must be 'patient' or 'slide', got '{self.bag_level}'")
        if self.optimizer not in ("adam", "adamw"):
            raise PathmilError(f"optimizer must be 'adam' or 'adamw', got '{self.optimizer}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise PathmilError(f"device must be auto, cpu or cuda, got '{self.device}'")
        if self.epochs < 1 or self.accumulation < 1 or self.patience < 1:
            raise PathmilError("epochs, accumulation and patience must be at least 1")


# -------------------------------------------------------------------------------------------- MHIM-MIL


@dataclasses.dataclass
class MHIMConfig:
    """MHIM-MIL settings, the ``mhim`` section of a training run with an ``mhim_*`` aggregator.

    Masked hard instance mining (Tang et al., ICCV 2023 = version 1; the 2025 extension = version 2): a
    momentum teacher ranks the instances of a bag and masks the most salient ones, so the student learns
    from the hard rest. ``random_ratio`` and ``low_ratio`` left at None take their version's default.
    """

    version: int = 2  # 1: teacher attention, random + low + high masks; 2: class-aware score, recycle
    teacher_init: str | None = None  # best.pt of the plain student trained on the same fold and features
    student_init: str = "none"  # from teacher_init: none, embed (the instance embedding; v1 scripts), all
    momentum: float = 0.9999  # teacher EMA after every step: theta_t <- m theta_t + (1 - m) theta_s
    momentum_cosine: bool = False  # raise m from `momentum` to 1 along a cosine over the run
    high_ratio: float = 0.01  # h: share of the bag masked from the top of the teacher's ranking
    high_random: float = 0.5  # hr: the N h masked are drawn from the top ceil(N h / hr); 1 masks the top N h
    high_decay: bool = True  # cosine decay of h from high_ratio to 0 over the run
    high_rounding: str = (
        "stochastic"  # N h masked: stochastic (expected share h) or ceil (authors: >= 1 always)
    )
    low_ratio: float | None = None  # share masked from the bottom of the ranking (None: v1 0.2, v2 0)
    random_ratio: float | None = None  # share of the rest masked at random (None: v1 0.5, v2 0)
    merge_ratio: float = 0.8  # v2: share of the unmasked instances the student sees as they are
    n_recycle_tokens: int = 1  # v2: k global queries recycling the other 1 - merge_ratio (paper 1, 5, 10)
    recycle_heads: int = 8  # v2: heads of the recycling cross-attention
    recycle_momentum: float = 0.9998  # v2: EMA momentum of the global queries towards their outputs
    consistency_weight: float = 0.1  # lambda of the teacher-student consistency loss
    teacher_temperature: float = 0.1  # sharpening of the teacher's bag embedding in the consistency loss
    student_temperature: float = 1.0

    def resolved_ratios(self) -> tuple[float, float]:
        """(low_ratio, random_ratio) with the version's defaults filled in."""
        low = self.low_ratio if self.low_ratio is not None else (0.2 if self.version == 1 else 0.0)
        rand = self.random_ratio if self.random_ratio is not None else (0.5 if self.version == 1 else 0.0)
        return low, rand

    def validate(self) -> None:
        """Refuse settings MHIM-MIL cannot run with, naming the setting."""
        if self.version not in (1, 2):
            raise PathmilError(f"mhim.version must be 1 or 2, got {self.version}")
        if self.high_rounding not in ("stochastic", "ceil"):
            raise PathmilError(f"mhim.high_rounding must be stochastic or ceil, got '{self.high_rounding}'")
        if self.student_init not in ("none", "embed", "all"):
            raise PathmilError(f"mhim.student_init must be none, embed or all, got '{self.student_init}'")
        if self.student_init != "none" and not self.teacher_init:
            raise PathmilError("mhim.student_init needs mhim.teacher_init (the baseline checkpoint to copy)")
        low, rand = self.resolved_ratios()
        shares = {"high_ratio": self.high_ratio, "low_ratio": low, "random_ratio": rand}
        for name, value in shares.items():
            if not 0 <= value < 1:
                raise PathmilError(f"mhim.{name} must be in [0, 1), got {value}")
        for name in ("high_random", "merge_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise PathmilError(f"mhim.{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("momentum", "recycle_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                raise PathmilError(f"mhim.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.n_recycle_tokens < 1 or self.recycle_heads < 1:
            raise PathmilError("mhim.n_recycle_tokens and mhim.recycle_heads must be at least 1")
        if self.teacher_temperature <= 0 or self.student_temperature <= 0 or self.consistency_weight < 0:
            raise PathmilError("mhim temperatures must be positive and consistency_weight not negative")


@dataclasses.dataclass
class EvaluateConfig:
    """How runs are summarised: bootstrap confidence intervals over the pooled test predictions."""

    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0


# ---------------------------------------------------------------------------------- predict and explain


@dataclasses.dataclass
class HeatmapConfig:
    """How ``pathmil heatmap`` paints instance scores over a slide and picks tiles for the montage."""

    max_px: int = 2048  # longest side of the thumbnail (and of the overlay) in pixels
    smooth: float = 0.0  # Gaussian smoothing of the painted scores, sigma in tiles; 0 turns it off
    alpha: float = 0.5  # opacity of the colours over the tissue
    cmap: str = "turbo"  # matplotlib colour map of the percentiles (low -> high)
    top_k: int = 8  # tiles with the highest and with the lowest scores in the montage
    montage_px: int = 192  # side of each montage tile in pixels
    device: str = "cpu"  # where the model runs: cpu, cuda or auto

    def validate(self) -> None:
        if self.max_px < 64:
            raise PathmilError(f"heatmap.max_px must be at least 64, got {self.max_px}")
        if self.smooth < 0:
            raise PathmilError(f"heatmap.smooth must be >= 0 (sigma in tiles), got {self.smooth}")
        if not 0 <= self.alpha <= 1:
            raise PathmilError(f"heatmap.alpha must be in [0, 1], got {self.alpha}")
        if self.top_k < 1 or self.montage_px < 16:
            raise PathmilError("heatmap.top_k must be at least 1 and heatmap.montage_px at least 16")
        import matplotlib

        if self.cmap not in matplotlib.colormaps:
            raise PathmilError(f"unknown colour map heatmap.cmap '{self.cmap}'; try turbo, viridis or jet")


@dataclasses.dataclass
class PlotConfig:
    """The evaluation plots written by ``pathmil evaluate``."""

    time_unit: str = "months"  # unit of the survival times in the cohort table (axis labels only)
    dpi: int = 120  # pixels per inch of the PNGs (a 6 x 5 inch plot is 720 x 600 px)
    calibration_bins: int = 10  # equal-width probability bins of the reliability diagram
