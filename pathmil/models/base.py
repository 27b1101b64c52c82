"""The contract every MIL aggregator keeps (../DESIGN.md).

``forward(x: (B, N, D), mask: (B, N) bool or None) -> MILOutput`` with ``logits (B, C)`` (C is the task's
``n_outputs``: models know nothing of tasks), ``embedding (B, E)`` (the bag representation before the
head) and ``instance_scores (B, N)`` (attention weights, pooling weights or per-tile predictions: what
heatmaps paint and what MHIM-MIL's teacher ranks). ``mask`` is True on real instances; padded positions
get no weight and never change the output.

Training-time behaviour beyond a plain forward (MHIM-MIL's teacher, masking and consistency loss) goes
through :meth:`MILModel.training_forward`, which may add an auxiliary loss, :meth:`MILModel.prepare_training`,
called when a new run starts, and :meth:`MILModel.after_step`, called after each optimiser step (EMA).
Inference always uses :meth:`forward`. :meth:`MILModel.checkpoint_inputs` names what a checkpoint keeps
besides the weights to rebuild a model whose structure depends on its inputs (MoE-PKT's source models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class MILOutput:
    logits: torch.Tensor  # (B, C)
    embedding: torch.Tensor  # (B, E)
    instance_scores: torch.Tensor  # (B, N)
    instance_embeddings: torch.Tensor | None = None  # (B, N, E): per-instance features before pooling
    aux_loss: torch.Tensor | None = None  # training only: added to the task loss (MHIM consistency)


class MILModel(nn.Module):
    """Base class of the aggregators: stores sizes and gives the default training hooks."""

    output_layers: tuple[str, ...] = ("classifier",)  # the submodules whose outputs are the n_outputs

    def __init__(self, in_dim: int, n_outputs: int):
        super().__init__()
        self.in_dim = in_dim
        self.n_outputs = n_outputs

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        raise NotImplementedError

    def training_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """The forward pass used for training steps; the default is the plain forward."""
        return self(x, mask)

    def output_tensors(self) -> list[str]:
        """Names (in ``state_dict()``) of the tensors that map to the ``n_outputs``: what a task's meaning
        of the outputs (a class list, time bins) binds; the rest of the model is task-agnostic."""
        return [n for n in self.state_dict() if n.split(".")[0] in self.output_layers]

    def prepare_training(self) -> None:
        """Called once when a new training run starts (not on resume); e.g. MHIM-MIL loads its teacher.
        The default does nothing."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (``step`` counts from 1); the default does nothing."""

    def checkpoint_inputs(self) -> dict[str, Any]:
        """Plain data a checkpoint keeps so that the model is rebuilt from the checkpoint alone, passed back
        to the builder as its declared inputs (MoE-PKT: its source models' architectures, whose weights are
        in the state dict); the default: nothing."""
        return {}


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` that gives masked-out (False) positions exactly zero weight."""
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=dim)
    if mask is not None:
        weights = weights * mask
    return weights
