"""The checkpoint file: everything needed to rebuild a model, and (``last.pt``) to resume its training.

``best.pt`` (the model to use) holds the full run config, the task's fitted state (classes, survival bins,
regression scaling), the aggregator's weights and what it expects as input (feature dimension, encoder),
as nanoGPT saves its config beside the weights: a checkpoint alone rebuilds the model. ``last.pt`` adds
the optimiser, schedule, random-number states and loop state (`pathmil.training`), so a killed run resumes
exactly. Reading and writing live here, below training, because models read checkpoints too (MHIM-MIL's
teacher starts from a baseline's ``best.pt``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pathmil import __version__
from pathmil.errors import PathmilError
from pathmil.fileio import atomic_output


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Save atomically, so a kill during the write leaves the previous checkpoint intact."""
    with atomic_output(path) as tmp:
        torch.save({"pathmil_version": __version__, **payload}, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on the CPU; a missing or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise PathmilError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise PathmilError(f"{path} is not a pathmil checkpoint (no model weights and config)")
    return checkpoint
