"""Magnitude ranking and permutation of heads and MLP channels before fine-tuning (spec §2.6).

The paper ranks "heads and hidden channels … based on a magnitude criterion" so that index 0,
which the routers keep on, is the most important unit. A unit is a contiguous block of rows of a
Linear's output (producers: Q/K/V, fc1) or of columns of its input (consumers: W_O, fc2, the
FLUX single block's fused proj_out). Scores sum the per-matrix norms over every producer and
consumer; the permutation moves the same blocks in all of them, which leaves the network function
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["UnitSlice", "apply_permutation", "rank_units", "unit_scores"]


@dataclass(frozen=True)
class UnitSlice:
    """Units of `size` channels of `linear`, starting at channel `start`.

    `rows=True`: output rows (and bias entries) — the unit produces channels; `rows=False`: input
    columns — the unit is consumed.
    """

    linear: nn.Linear
    rows: bool
    size: int
    start: int = 0


def _blocks(weight: torch.Tensor, part: UnitSlice, units: int) -> torch.Tensor:
    """The weight entries of every unit, [units, size·other_dim]."""
    span = weight.narrow(0 if part.rows else 1, part.start, units * part.size)
    if not part.rows:
        span = span.t()
    return span.reshape(units, -1)


def unit_scores(parts: list[UnitSlice], units: int, norm: Literal["l1", "l2"] = "l1") -> torch.Tensor:
    """Score s_u = Σ_parts ‖W_part[u]‖ (L1 or L2 over each unit's block, spec §2.6 steps 1 and 3)."""
    scores = torch.zeros(units, dtype=torch.float64)
    order = 1 if norm == "l1" else 2
    with torch.no_grad():
        for part in parts:
            block = _blocks(part.linear.weight.detach().double().cpu(), part, units)
            scores += torch.linalg.vector_norm(block, ord=order, dim=1)
    return scores


def rank_units(parts: list[UnitSlice], units: int, norm: Literal["l1", "l2"] = "l1") -> torch.Tensor:
    """Permutation [units] sorting units by descending score (stable for ties)."""
    return torch.argsort(unit_scores(parts, units, norm), descending=True, stable=True)


def _permute(tensor: torch.Tensor, dim: int, part: UnitSlice, perm: torch.Tensor) -> None:
    span = tensor.narrow(dim, part.start, perm.numel() * part.size)
    blocks = span.unflatten(dim, (perm.numel(), part.size))
    span.copy_(blocks.index_select(dim, perm.to(tensor.device)).flatten(dim, dim + 1))


def apply_permutation(parts: list[UnitSlice], perm: torch.Tensor) -> None:
    """Move unit perm[i] to position i in every part, in place (weights and producer biases)."""
    with torch.no_grad():
        for part in parts:
            _permute(part.linear.weight, 0 if part.rows else 1, part, perm)
            if part.rows and part.linear.bias is not None:
                _permute(part.linear.bias, 0, part, perm)
