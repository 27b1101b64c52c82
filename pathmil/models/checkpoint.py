"""The checkpoint file: everything needed to rebuild a model, and (``last.pt``) to resume its training.

``best.pt`` (the model to use) holds the full run config, the task's fitted state (classes, survival bins,
regression scaling), the aggregator's weights and what it expects as input (feature dimension, encoder),
as nanoGPT saves its config beside the weights: a checkpoint alone rebuilds the model. ``last.pt`` adds
the optimiser, schedule, random-number states, loop state and a copy of the best weights
(`pathmil.training`), so a killed run resumes exactly even when ``best.pt`` was deleted. Reading and
writing live here, below training, because models read checkpoints too (MHIM-MIL's teacher starts from a
baseline's ``best.pt``).

No checkpoint holding NaN or inf weights is written or loaded: a diverged run is one line, never a model
that scores NaN.

Checkpoints hold tensors and plain data only (dicts, lists, tuples, strings, numbers, None) and are read
with ``torch.load(weights_only=True)``: a file whose pickle would build any other object (and so could
run code) is refused, never executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pathmil import __version__
from pathmil.errors import PathmilError
from pathmil.fileio import atomic_output, load_tensors_safely

# Version of the checkpoint layout; files without one are version 1 (pathmil 0.1 before the field). Raise it
# when what a checkpoint holds changes meaning; settings added or removed are handled when a run is loaded
# (pathmil.training.run.load_run: a warning naming the file and both versions, or one line if it cannot).
FORMAT_VERSION = 2
REQUIRED_KEYS = ("model", "config", "task", "aggregator", "in_dim")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Save atomically, so a kill during the write leaves the previous checkpoint intact.

    Raises:
        PathmilError: the weights (``model``, or the best weights a ``last.pt`` carries) hold NaN or inf;
            nothing is written.
        DiskFullError: no space left for the file (nothing is left behind).
    """
    for weights in (payload.get("model"), (payload.get("best") or {}).get("model")):
        bad = non_finite_weights(weights)
        if bad:
            raise PathmilError(
                f"refusing to write {path}: its weights {bad} hold NaN or inf (the training diverged); "
                "lower the learning rate (lr) or set grad_clip"
            )
    with atomic_output(path) as tmp:
        torch.save({"pathmil_version": __version__, "format_version": FORMAT_VERSION, **payload}, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a pathmil checkpoint on the CPU, safely (tensors and plain data only).

    Raises:
        PathmilError: the file is missing, damaged, would need code to load, or is not a pathmil
            checkpoint (a dict with model weights, config, task, aggregator and input size).
    """
    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"checkpoint {path} does not exist")
    checkpoint = load_tensors_safely(path, what="checkpoint")
    if not isinstance(checkpoint, dict):
        raise PathmilError(f"{path} is not a pathmil checkpoint (it holds a {type(checkpoint).__name__})")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise PathmilError(
            f"{path} is not a pathmil checkpoint: it lacks {', '.join(missing)} (a run's best.pt or "
            "last.pt has them)"
        )
    bad = non_finite_weights(checkpoint["model"])
    if bad:
        raise PathmilError(
            f"checkpoint {path} holds NaN or inf weights ({bad}): its training diverged; train it again "
            "with a lower learning rate (lr) or grad_clip"
        )
    return checkpoint


def describe_version(checkpoint: dict[str, Any] | None = None) -> str:
    """``pathmil X, checkpoint format N`` of a checkpoint (``None``: of this pathmil), for messages."""
    if checkpoint is None:
        return f"pathmil {__version__}, checkpoint format {FORMAT_VERSION}"
    return (
        f"pathmil {checkpoint.get('pathmil_version', 'unknown')}, "
        f"checkpoint format {checkpoint.get('format_version', 1)}"
    )


def same_version(checkpoint: dict[str, Any]) -> bool:
    """Whether this pathmil wrote ``checkpoint`` (same package version and format)."""
    return (checkpoint.get("pathmil_version"), checkpoint.get("format_version", 1)) == (
        __version__,
        FORMAT_VERSION,
    )


def non_finite_weights(weights: dict[str, Any] | None) -> str | None:
    """The name of the first floating-point tensor of ``weights`` that holds NaN or inf, else None."""
    for name, value in (weights or {}).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


# ------------------------------------------------------------------------------------------- packages

# A package (`pathmil package`) is a folder: the manifest, a model card, and its fold models' checkpoints,
# byte for byte the runs' best.pt files (so they load as safely as any checkpoint).
PACKAGE_MANIFEST = "package.json"
PACKAGE_FORMAT = "pathmil-package"
PACKAGE_FORMAT_VERSION = 1


def is_package(path: str | os.PathLike) -> bool:
    """True for a package folder (it holds ``package.json``)."""
    return (Path(path) / PACKAGE_MANIFEST).is_file()


def read_package_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of package ``path``, its format and version checked.

    Raises:
        PathmilError: no manifest, unreadable JSON, another format, or a newer format version.
    """
    import json

    manifest_path = Path(path) / PACKAGE_MANIFEST
    if not manifest_path.is_file():
        raise PathmilError(
            f"{path} is not a pathmil package (no {PACKAGE_MANIFEST}); make one with `pathmil package`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PathmilError(f"package {path}: {PACKAGE_MANIFEST} is not readable JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise PathmilError(
            f"{path} is not a pathmil package ({PACKAGE_MANIFEST} lacks format '{PACKAGE_FORMAT}')"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > PACKAGE_FORMAT_VERSION:
        raise PathmilError(
            f"package {path} has format version {version}, this pathmil ({__version__}) reads versions up to "
            f"{PACKAGE_FORMAT_VERSION}; update pathmil"
        )
    return manifest


def package_members(path: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """The fold models of package ``path``: (checkpoint file, checkpoint), each file's sha256 checked against
    the manifest, so a damaged or swapped member is refused rather than scored.

    Raises:
        PathmilError: a bad manifest (:func:`read_package_manifest`), a missing member, a member whose bytes
            differ from the manifest's sha256, or one that is not a safe pathmil checkpoint.
    """
    from pathmil.fileio import file_sha256

    manifest = read_package_manifest(path)
    members = []
    for entry in manifest.get("members") or []:
        file = Path(path) / entry["file"]
        if not file.is_file():
            raise PathmilError(
                f"package {path} lacks its member {entry['file']}; copy the whole package folder"
            )
        if file_sha256(file) != entry.get("sha256"):
            raise PathmilError(
                f"package {path}: member {entry['file']} differs from the one packaged (sha256 mismatch); "
                "the package is damaged or was edited: package the runs again"
            )
        members.append((file, load_checkpoint(file)))
    if not members:
        raise PathmilError(f"package {path} lists no member models")
    return members


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files :func:`model_checkpoints` reads at ``path``, without reading them: a package's manifest
    (it holds its members' sha256), a run folder's ``best.pt``, or the checkpoint file itself."""
    path = Path(path)
    if path.is_dir():
        return [path / PACKAGE_MANIFEST] if is_package(path) else [path / "best.pt"]
    return [path]


def model_checkpoints(path: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """The trained models at ``path``: a package's members, a finished run folder's ``best.pt``, or a
    checkpoint file; (file, checkpoint) each. Transfer (``train.init_from``, ``moe_pkt``'s sources) reads
    its source models through here.

    Raises:
        PathmilError: nothing loadable at ``path`` (a missing file, an unfinished run, a bad package).
    """
    path = Path(path)
    if path.is_dir():
        if is_package(path):
            return package_members(path)
        if not (path / "metrics.json").is_file():
            raise PathmilError(
                f"{path} is neither a package nor a finished run folder (no {PACKAGE_MANIFEST}, no metrics.json)"
            )
        path = path / "best.pt"
    return [(path, load_checkpoint(path))]
