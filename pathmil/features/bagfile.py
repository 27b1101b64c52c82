"""The bag file: one HDF5 per slide holding the features of its tiles, and readers of other layouts.

pathmil writes ``features`` (N x D, float16 by default), a copy of the tiles file's ``coords`` with its
attributes, and provenance attributes on the root (``pathmil_version``, ``slide_id``, ``encoder``,
``encoder_weights_sha256``, ``tile_px``, ``target_mpp``, ``slide_mpp``, ...); both datasets carry HDF5's
Fletcher-32 checksum, so a flipped byte is found when the file is read. :func:`read_bag` also reads the
feature files of the tools users already ran, so they can train on what they have:

- CLAM: ``h5_files/<slide>.h5`` with ``features`` and ``coords`` (no attributes), or ``pt_files/<slide>.pt``
  holding the N x D tensor alone;
- TRIDENT: ``features`` (its ``encoder`` attribute names the encoder) and ``coords`` with
  ``patch_size_level0`` and friends;
- STAMP: ``feats`` and ``coords`` in micrometres (attribute ``unit`` or ``tile_size_um``), the encoder in
  the root attribute ``extractor``;
- slideflow: ``<slide>.pt`` (N x D) with ``<slide>.index.npz`` (``arr_0``: level-0 tile centres) and the
  folder's ``bags_config.json`` (extractor, ``tile_um``).

Foreign encoder names that denote one of pathmil's encoders (TRIDENT's ``uni_v1``, STAMP's ``uni``) are
read as pathmil's name, so the check that refuses a model trained on another encoder compares like with
like.

Every bag is checked when read (one line naming the file and what is wrong): a file that is empty,
truncated or damaged; no ``features``; zero instances; integer features; ``coords`` whose length differs
from the features'; rows with NaN or inf (refused: pathmil never drops rows silently, and a bag with
non-finite features was made wrongly); values beyond float16's range (pathmil holds features as float16).
Float64 features are read with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathmil import __version__
from pathmil.batch import check_not_failure_record
from pathmil.errors import PathmilError
from pathmil.fileio import atomic_hdf5, load_tensors_safely, plain_attr

log = logging.getLogger(__name__)

LAYOUTS = ("pathmil", "trident", "clam", "clam_pt", "stamp", "slideflow")
REDO = "delete it and extract the slide again"
FLOAT16_MAX = float(np.finfo(np.float16).max)  # features are held as float16 in training and prediction
# Other tools' names of encoders pathmil has (same architecture and weights): read as pathmil's name.
ENCODER_ALIASES = {
    # TRIDENT (patch_encoder_models/load.py)
    "uni_v1": "uni",
    "uni_v2": "uni2_h",
    "hoptimus0": "h_optimus_0",
    "hoptimus1": "h_optimus_1",
    "gigapath": "prov_gigapath",
    "conch_v15": "conch_v1_5",
    # STAMP (preprocessing/config.py, ExtractorName)
    "uni2": "uni2_h",
    "h-optimus-0": "h_optimus_0",
    "h-optimus-1": "h_optimus_1",
    "conch1_5": "conch_v1_5",
}
_warned_float64: set[str] = set()


@dataclass
class Bag:
    """Features of one slide's tiles, their coordinates, and what is known about how they were made.

    ``coords`` are level-0 top-left corners in pixels, micrometres when ``coords_unit`` is "um" (STAMP),
    or tile centres when ``coords_origin`` is "centre" (slideflow).
    """

    features: np.ndarray  # N x D
    coords: np.ndarray | None  # N x 2
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    layout: str = "pathmil"
    coords_unit: str = "px"
    coords_origin: str = "corner"

    @property
    def n_instances(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def write_bag(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray,
    coords_attrs: dict[str, Any],
    attrs: dict[str, Any],
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write a pathmil bag file atomically; ``extra`` holds further per-tile datasets (e.g. names).

    ``features`` and ``coords`` carry Fletcher-32 checksums (HDF5's filter), so damage is found on reading.
    """
    if features.ndim != 2 or len(features) != len(coords):
        raise ValueError(f"features {features.shape} do not match coords {coords.shape}")
    with atomic_hdf5(path) as f:
        f.create_dataset(
            "features",
            data=features,
            chunks=(min(len(features), 1024), features.shape[1]) if len(features) else None,
            fletcher32=True,
        )
        dset = f.create_dataset("coords", data=np.asarray(coords, np.int64), fletcher32=True)
        for key, value in coords_attrs.items():
            if value is not None:
                dset.attrs[key] = value
        for name, values in (extra or {}).items():
            f.create_dataset(name, data=values)
        f.attrs["pathmil_version"] = __version__
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value


# ------------------------------------------------------------------------------------------- reading


@contextlib.contextmanager
def open_h5(path: str | os.PathLike, what: str = "feature file") -> Iterator[h5py.File]:
    """Open an HDF5 file to read; an empty, truncated or damaged file is one line naming it (also when the
    damage shows only while a dataset is read inside the block).

    Raises:
        PathmilError: the file is missing, empty, not HDF5, truncated, or fails its checksums.
    """
    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"{what} {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise PathmilError(f"{what} {path} is empty (0 bytes), as a killed copy or job leaves it; {REDO}")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise PathmilError(f"{what} {path} {_diagnose(err, size)}; {REDO}") from None
    try:
        with handle:
            yield handle
    except (OSError, KeyError, RuntimeError) as err:  # what h5py raises for damaged metadata or data
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise PathmilError(f"{what} {path} is damaged ({first}); {REDO}") from None


def _diagnose(err: OSError, size: int) -> str:
    """What h5py's open error means, in words."""
    text = str(err)
    truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
    if truncated:
        return f"is truncated ({int(truncated.group(1)):,} of {int(truncated.group(2)):,} bytes)"
    if "signature not found" in text:
        return f"is not an HDF5 file ({size:,} bytes without an HDF5 signature)"
    return f"cannot be read as HDF5 ({text.strip().splitlines()[0][:160]})"


def read_bag_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance of a bag without reading its features (cheap): the root attributes, with
    ``encoder`` filled in from TRIDENT's, STAMP's or slideflow's own record of it.

    Raises:
        PathmilError: the file is missing or damaged.
    """
    path = Path(path)
    if path.suffix == ".pt":
        return _slideflow_attrs(path)
    with open_h5(path) as f:
        attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
        encoder = _encoder_of(f, attrs)
    return {**attrs, "encoder": encoder} if encoder is not None else attrs


def _encoder_of(f: h5py.File, attrs: dict[str, Any]) -> str | None:
    """The encoder a bag names: pathmil's ``encoder``, TRIDENT's on ``features``, STAMP's ``extractor``."""
    name = attrs.get("encoder")
    if name is None and "features" in f:
        name = plain_attr(f["features"].attrs.get("encoder"))
    if name is None:
        name = attrs.get("extractor")
    if name is None or str(name) in ("", "None"):
        return None
    return ENCODER_ALIASES.get(str(name), str(name))


def bag_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(N, D) of a bag file without reading its features; refuses what :func:`read_bag` refuses of the
    shape and type (no features, zero instances, integer features).

    Raises:
        PathmilError: naming the file and what is wrong.
    """
    path = Path(path)
    if path.suffix == ".pt":
        return read_bag(path).features.shape  # type: ignore[return-value]
    with open_h5(path) as f:
        name = _features_name(f, path)
        shape, dtype = f[name].shape, f[name].dtype
    shape = shape[1:] if len(shape) == 3 and shape[0] == 1 else shape
    if len(shape) != 2:
        raise PathmilError(f"feature file {path}: features have shape {shape}, expected N x D; {REDO}")
    _check_type_and_size(path, (int(shape[0]), int(shape[1])), dtype)
    return int(shape[0]), int(shape[1])


def feature_provenance(attrs: dict[str, Any]) -> dict[str, Any]:
    """How a bag's features were made, from its root attributes: the encoder (name, weights' sha256, random
    init) and the tiling settings (:func:`pathmil.slide.tilefile.tiling_of`; None where unknown). Training
    keeps it in every checkpoint, and a package checks new features against it."""
    from pathmil.slide.tilefile import tiling_of

    return {
        "encoder": attrs.get("encoder"),
        "encoder_weights_sha256": attrs.get("encoder_weights_sha256"),
        "random_init": bool(attrs.get("random_init", False)),
        "tiling": tiling_of(attrs),
    }


def read_bag(path: str | os.PathLike) -> Bag:
    """Read and check a bag file of any supported layout (pathmil, TRIDENT, CLAM .h5 or .pt, STAMP,
    slideflow).

    Raises:
        PathmilError: one line naming the file and what is wrong (see the module's docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"feature file {path} does not exist")
    if path.suffix == ".pt":
        bag = _read_pt(path)
    else:
        with open_h5(path) as f:
            bag = _read_h5(f, path)
    check_bag_contents(bag, path)
    return bag


def _features_name(f: h5py.File, path: Path) -> str:
    check_not_failure_record({k: plain_attr(v) for k, v in f.attrs.items()}, path)
    for name in ("features", "feats"):
        if name in f:
            return name
    raise PathmilError(
        f"feature file {path} has neither 'features' (pathmil, CLAM, TRIDENT) nor 'feats' (STAMP) "
        f"(it holds {', '.join(sorted(f.keys())) or 'nothing'}); {REDO}"
    )


def _read_h5(f: h5py.File, path: Path) -> Bag:
    name = _features_name(f, path)
    attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
    encoder = _encoder_of(f, attrs)
    if encoder is not None:
        attrs["encoder"] = encoder
    features = _as_matrix(f[name][:], path)
    coords, coords_attrs = _coords(f)
    if name == "feats":
        unit = str(coords_attrs.get("unit", attrs.get("unit", "um")))
        unit = "um" if unit.lower() in ("um", "micron", "microns", "micrometre", "micrometer") else "px"
        return Bag(features, coords, coords_attrs, attrs, "stamp", coords_unit=unit)
    if "pathmil_version" in attrs:
        layout = "pathmil"
    elif "patch_size_level0" in coords_attrs or "level0_width" in coords_attrs:
        layout = "trident"
    else:
        layout = "clam"
    return Bag(features, coords, coords_attrs, attrs, layout)


def _coords(f: h5py.File) -> tuple[np.ndarray | None, dict[str, Any]]:
    if "coords" not in f:
        return None, {}
    coords = f["coords"][:]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    return coords, {k: plain_attr(v) for k, v in f["coords"].attrs.items()}


def _as_matrix(features: np.ndarray, path: Path) -> np.ndarray:
    """N x D features; some tools save 1 x N x D."""
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise PathmilError(
            f"feature file {path}: features have shape {features.shape}, expected N x D; {REDO}"
        )
    return features


def _read_pt(path: Path) -> Bag:
    """CLAM's ``pt_files/<slide>.pt`` (the tensor alone), or slideflow's bag with its ``.index.npz``."""
    import torch

    tensor = load_tensors_safely(path, what="feature file")
    if not isinstance(tensor, torch.Tensor):
        raise PathmilError(
            f"feature file {path}: expected a tensor of N x D features (CLAM pt_files, slideflow bags), "
            f"found a {type(tensor).__name__}"
        )
    if tensor.is_floating_point():
        tensor = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
    features = _as_matrix(tensor.numpy(), path)
    index = path.with_name(f"{path.stem}.index.npz")
    if not index.is_file():
        return Bag(features, None, {}, {}, "clam_pt")
    try:
        with np.load(index) as saved:
            centres = np.asarray(saved["arr_0"])
    except (OSError, KeyError, ValueError) as err:
        raise PathmilError(f"slideflow index {index} cannot be read ({err}); export the bags again") from None
    attrs = _slideflow_attrs(path)
    coords_attrs = {k: attrs[k] for k in ("tile_um", "tile_px") if k in attrs}
    return Bag(features, centres, coords_attrs, attrs, "slideflow", coords_origin="centre")


def _slideflow_attrs(path: Path) -> dict[str, Any]:
    """What slideflow's ``bags_config.json`` beside a ``.pt`` bag says: encoder (extractor class), tile size."""
    config_path = path.parent / "bags_config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PathmilError(f"slideflow's {config_path} cannot be read ({err})") from None
    attrs: dict[str, Any] = {}
    extractor = config.get("extractor")
    name = extractor.get("class") if isinstance(extractor, dict) else extractor
    if name:
        kwargs = extractor.get("kwargs") if isinstance(extractor, dict) else None
        model = (kwargs or {}).get("model_name")
        attrs["encoder"] = str(name).rsplit(".", 1)[-1] + (f"({model})" if model else "")
    if isinstance(config.get("tile_um"), (int, float)):
        attrs["tile_um"] = float(config["tile_um"])
    if isinstance(config.get("tile_px"), int):
        attrs["tile_px"] = config["tile_px"]
        if "tile_um" in attrs:  # the tiles' resolution, compared with a model's training tiles
            attrs["target_mpp"] = attrs["tile_um"] / attrs["tile_px"]
    return attrs


# ------------------------------------------------------------------------------------------ checking


def _check_type_and_size(path: Path, shape: tuple[int, int], dtype: np.dtype) -> None:
    n, d = shape
    if n == 0:
        raise PathmilError(
            f"feature file {path} holds no instances (0 tiles); drop the slide from the cohort, or tile and "
            "extract it again"
        )
    if d == 0:
        raise PathmilError(f"feature file {path} holds 0-dimensional features; {REDO}")
    if dtype.kind != "f":
        raise PathmilError(
            f"feature file {path} holds {dtype} features; features must be floating point (float16 or "
            "float32): is it a feature file, or were the features saved as integers?"
        )


def check_bag_contents(bag: Bag, path: str | os.PathLike) -> None:
    """Refuse a bag whose contents cannot be used as they are (one line naming the file); warn of float64.

    Raises:
        PathmilError: zero instances, integer features, coordinates that do not match the features,
            rows with NaN or inf, or values beyond float16's range.
    """
    path = Path(path)
    features = bag.features
    _check_type_and_size(path, features.shape, features.dtype)
    if bag.coords is not None:
        if bag.coords.ndim != 2 or bag.coords.shape[1] != 2:
            raise PathmilError(
                f"feature file {path}: coords have shape {bag.coords.shape}, expected N x 2; {REDO}"
            )
        if len(bag.coords) != len(features):
            raise PathmilError(
                f"feature file {path} has {len(features)} feature rows but {len(bag.coords)} coords; {REDO}"
            )
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():
        raise PathmilError(
            f"feature file {path} has {int((~finite).sum())} of {len(features)} rows with NaN or inf features "
            f"(first: row {int(np.argmin(finite))}); pathmil refuses such bags: {REDO} (with --precision fp32)"
        )
    if features.dtype.itemsize > 2:
        largest = float(np.abs(features).max())
        if largest > FLOAT16_MAX:
            raise PathmilError(
                f"feature file {path} holds values beyond float16's range (largest |x| {largest:.3g} > "
                f"{FLOAT16_MAX:g}); pathmil holds features as float16: rescale them"
            )
    if features.dtype == np.float64 and str(path) not in _warned_float64:
        _warned_float64.add(str(path))
        log.warning("feature file %s holds float64 features; pathmil holds them as float16, as its own", path)
