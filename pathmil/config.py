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
