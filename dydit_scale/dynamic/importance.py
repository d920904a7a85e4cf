"""Magnitude ranking and permutation of heads and MLP channels before fine-tuning.

The DyDiT paper (Sec. 3.4) ranks "heads and hidden channels … based on a magnitude criterion" so
that index 0, which the routers keep on, is the most important unit. A unit is a contiguous block
of rows of a Linear's output (producers: Q/K/V, fc1) or of columns of its input (consumers: W_O,
fc2, the FLUX single block's fused proj_out). Scores sum the per-matrix norms over every producer
and consumer; the permutation moves the same blocks in all of them, which leaves the network
function unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = [
    "PermutedSpan",
    "UnitSlice",
    "apply_permutation",
    "permute_block",
    "rank_units",
    "reorder_state_dict",
    "unit_scores",
]


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
    """Score s_u = Σ_parts ‖W_part[u]‖, L1 or L2 over each unit's block in each part.

    A head scores its Q/K/V output rows plus its W_O input columns; an MLP channel its fc1 row plus
    its fc2 column.
    """
    scores = torch.zeros(units, dtype=torch.float64)
    order = 1 if norm == "l1" else 2
    with torch.no_grad():
        for part in parts:
            block = _blocks(part.linear.weight.detach().double().cpu(), part, units)
            scores += torch.linalg.vector_norm(block, ord=order, dim=1)
    return scores


def rank_units(parts: list[UnitSlice], units: int, norm: Literal["l1", "l2", "none"] = "l1") -> torch.Tensor:
    """Permutation [units] sorting units by descending score (stable for ties); "none" keeps the
    order as loaded, for weights already ranked (the released DyDiT checkpoints)."""
    if norm == "none":
        return torch.arange(units)
    return torch.argsort(unit_scores(parts, units, norm), descending=True, stable=True)


def _permute(tensor: torch.Tensor, dim: int, size: int, start: int, perm: torch.Tensor) -> None:
    span = tensor.narrow(dim, start, perm.numel() * size)
    blocks = span.unflatten(dim, (perm.numel(), size))
    span.copy_(blocks.index_select(dim, perm.to(tensor.device)).flatten(dim, dim + 1))


def apply_permutation(parts: list[UnitSlice], perm: torch.Tensor) -> None:
    """Move unit perm[i] to position i in every part, in place (weights and producer biases)."""
    with torch.no_grad():
        for part in parts:
            _permute(part.linear.weight, 0 if part.rows else 1, part.size, part.start, perm)
            if part.rows and part.linear.bias is not None:
                _permute(part.linear.bias, 0, part.size, part.start, perm)


@dataclass(frozen=True)
class PermutedSpan:
    """Where one permutation moved units of one Linear, by module name, so that tensors written for
    other tools (LoRA factors, whole weights) can be put back into the base model's order.

    `perm[i]` is the original index of the unit now at position i; `rows` as in `UnitSlice`.
    """

    module: str
    rows: bool
    size: int
    start: int
    perm: torch.Tensor


def permute_block(block: nn.Module, units: dict[str, tuple[list[UnitSlice], int]], norm: Literal["l1", "l2", "none"],
                  where: str) -> tuple[dict[str, torch.Tensor], list[PermutedSpan]]:
    """Rank and permute each named unit kind of `block` (at module path `where`): {kind: (parts, count)}.

    Returns the permutations by `<where>.<kind>` and the spans they moved, with module names relative
    to the whole model, so files written for other tools can be put back into the base order.
    """
    names = {id(module): f"{where}.{name}" for name, module in block.named_modules()}
    perms, spans = {}, []
    for kind, (parts, count) in units.items():
        perm = rank_units(parts, count, norm)
        apply_permutation(parts, perm)
        perms[f"{where}.{kind}"] = perm
        spans += [PermutedSpan(names[id(p.linear)], p.rows, p.size, p.start, perm.detach().cpu()) for p in parts]
    return perms, spans


#: parameter suffix -> (which span kind it follows, the tensor dim it moves along)
_SUFFIX_SPANS = {
    "weight": ((True, 0), (False, 1)),
    "bias": ((True, 0),),
    "lora_A.weight": ((False, 1),),  # [r, in]: only the input columns move
    "lora_B.weight": ((True, 0),),  # [out, r]: only the output rows move
}


def _split_key(key: str) -> tuple[str, str]:
    """`<module>[.base_layer].weight`, `<module>.lora_A[.default].weight` -> (module, suffix)."""
    parts = [p for p in key.split(".") if p != "default"]
    if len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B"):
        module, suffix = parts[:-2], ".".join(parts[-2:])
    else:
        module, suffix = parts[:-1], parts[-1]
    if module and module[-1] == "base_layer":
        module = module[:-1]
    return ".".join(module), suffix


@torch.no_grad()
def reorder_state_dict(state: dict[str, torch.Tensor], spans: list[PermutedSpan], *,
                       to_base: bool) -> dict[str, torch.Tensor]:
    """A copy of `state` (plain weights, peft `base_layer` or LoRA A/B keys) with every permuted span
    moved back to the base model's order (`to_base=True`) or into the dynamic model's order.

    Keys outside any span are passed through; the input tensors are not modified.
    """
    by_module: dict[str, list[PermutedSpan]] = {}
    for span in spans:
        by_module.setdefault(span.module, []).append(span)
    out = {}
    for key, tensor in state.items():
        module, suffix = _split_key(key)
        moves = _SUFFIX_SPANS.get(suffix, ())
        for span in by_module.get(module, ()):
            for rows, dim in moves:
                if span.rows == rows:
                    perm = torch.argsort(span.perm) if to_base else span.perm
                    tensor = tensor.clone() if tensor is state[key] else tensor
                    _permute(tensor, dim, span.size, span.start, perm)
        out[key] = tensor
    return out
