"""Seeding and random-number state, for exact and resumable runs (the checkpoint file itself is
`pathmil.models.checkpoint`)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a run draws from."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (libraries' global RNG)
    state = {
        "python": random.getstate(),
        # plain data and tensors only, so checkpoints load with weights_only=True
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["kind"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
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
