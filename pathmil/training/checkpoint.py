"""Checkpoints that carry everything needed to use or resume a model.

``best.pt`` (the model to use) holds the full run config, the task's fitted state (classes, survival bins,
regression scaling), the aggregator's weights and what it expects as input (feature dimension, encoder),
as nanoGPT saves its config beside the weights: a checkpoint alone rebuilds the model. ``last.pt`` adds
the optimiser, schedule, random-number states and loop state, so a killed run resumes exactly.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
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


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a run draws from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the legacy global RNG that libraries draw from)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """One seed for python, numpy and torch (CPU and CUDA).

    CPU kernels are deterministic as they are; ``torch.use_deterministic_algorithms`` is not called because
    it imports the compiler stack (seconds per process) and only matters for some CUDA kernels.
    """
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seed the legacy global RNG for libraries that use it)
    torch.manual_seed(seed)
