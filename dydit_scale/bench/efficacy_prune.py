"""Static pruning baseline of `dydit-bench efficacy`: the least important self-attention heads and MLP
channel groups of a PixArt-α transformer removed for good, down to a target FLOPs ratio. The DyDiT
paper compares DyDiT with pruning methods at equal FLOPs (Sec. 4.2: Figure 3, Table 2); this is
that baseline at the FLOPs the dynamic arm realised, ranked with the same magnitude criterion as
`make_dynamic`, so both start from the same notion of importance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import nn

from dydit_scale.dynamic import flops
from dydit_scale.dynamic.importance import UnitSlice, rank_units
from dydit_scale.models.adaln_block import head_parts

__all__ = ["PrunePlan", "plan_pruning", "prune_static", "pruned_macs_ratio"]


@dataclass(frozen=True)
class PrunePlan:
    """Kept self-attention heads and MLP groups per block, out of `total_heads` and `total_groups`."""

    heads: tuple[int, ...]
    groups: tuple[int, ...]
    total_heads: int
    total_groups: int
    flops_ratio: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class _BlockShape:
    """What the block MACs formula needs of one unpruned block, per sample."""

    tokens: int
    context_tokens: int
    width: int
    head_dim: int
    heads: int
    hidden: int
    context_width: int | None

    def macs(self, heads: int, group_fraction: Fraction = Fraction(1)) -> Fraction:
        return flops.pixart_block_macs(
            tokens=self.tokens, context_tokens=self.context_tokens, width=self.width, head_dim=self.head_dim,
            heads=self.heads, active_heads=heads, group_fraction=group_fraction,
            mlp_ratio=self.hidden / self.width, context_width=self.context_width,
        )


def _shape(block: nn.Module, heads: int, head_dim: int, hidden: int, image_tokens: int,
           text_tokens: int) -> _BlockShape:
    attn2 = getattr(block, "attn2", None)
    return _BlockShape(tokens=image_tokens, context_tokens=0 if attn2 is None else text_tokens,
                       width=block.attn1.to_q.in_features, head_dim=head_dim, heads=heads, hidden=hidden,
                       context_width=None if attn2 is None else attn2.to_k.in_features)


def _ratio(shapes: list[_BlockShape], heads: list[int], fractions: list[Fraction]) -> Fraction:
    pruned = sum(shape.macs(h, f) for shape, h, f in zip(shapes, heads, fractions, strict=True))
    return Fraction(pruned) / sum(shape.macs(shape.heads) for shape in shapes)


def plan_pruning(model: nn.Module, target_ratio: float, *, image_tokens: int, text_tokens: int,
                 groups: int | None = None) -> PrunePlan:
    """Remove heads and MLP groups one at a time, always of the unit kind and block that keeps the largest
    fraction of its units (ties: heads first, then the lower block), until the analytic block MACs ratio
    is ≤ `target_ratio`; that state or the one before, whichever is closer to the target.

    `groups`: MLP groups per block (None: one per head). Each block keeps ≥ 1 head and ≥ 1 group; an
    unreachable target gives the smallest such state.
    """
    if not 0 < target_ratio <= 1:
        raise ValueError(f"plan_pruning: target_ratio must be in (0, 1], got {target_ratio}")
    blocks = list(model.transformer_blocks)
    total_heads = blocks[0].attn1.heads
    total_groups = groups or total_heads
    shapes = []
    for i, block in enumerate(blocks):
        heads, hidden = block.attn1.heads, block.ff.net[0].proj.out_features
        if heads != total_heads or hidden % total_groups:
            raise ValueError(f"plan_pruning: block {i} has {heads} heads and MLP width {hidden}; need "
                             f"{total_heads} heads and a width divisible by {total_groups} groups")
        head_dim = block.attn1.to_q.out_features // heads
        shapes.append(_shape(block, heads, head_dim, hidden, image_tokens, text_tokens))
    kept = {"heads": [total_heads] * len(blocks), "groups": [total_groups] * len(blocks)}
    totals = {"heads": total_heads, "groups": total_groups}

    def ratio() -> Fraction:
        return _ratio(shapes, kept["heads"], [Fraction(g, total_groups) for g in kept["groups"]])

    state = (tuple(kept["heads"]), tuple(kept["groups"]), ratio())
    previous = None
    while state[2] > target_ratio:
        candidates = [(Fraction(-count, totals[kind]), rank, i, kind)
                      for rank, kind in enumerate(("heads", "groups"))
                      for i, count in enumerate(kept[kind]) if count > 1]
        if not candidates:
            break
        _, _, i, kind = min(candidates)
        kept[kind][i] -= 1
        previous, state = state, (tuple(kept["heads"]), tuple(kept["groups"]), ratio())
    target = Fraction(target_ratio)
    if previous is not None and abs(previous[2] - target) < abs(state[2] - target):
        state = previous
    return PrunePlan(heads=state[0], groups=state[1], total_heads=total_heads, total_groups=total_groups,
                     flops_ratio=float(state[2]))


@torch.no_grad()
def _select(linear: nn.Linear, index: torch.Tensor, rows: bool) -> nn.Linear:
    """A new Linear with only the output rows (and bias entries) or input columns `index` of `linear`."""
    weight = linear.weight
    index = index.to(weight.device)
    out_features, in_features = (index.numel(), linear.in_features) if rows else (linear.out_features, index.numel())
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    new.weight.copy_(weight.index_select(0 if rows else 1, index))
    if linear.bias is not None:
        new.bias.copy_(linear.bias.index_select(0, index) if rows else linear.bias)
    return new


def prune_static(model: nn.Module, plan: PrunePlan, *, norm: Literal["l1", "l2"] = "l1") -> nn.Module:
    """Remove, in place, the lowest-magnitude self-attention heads and MLP channels of every block so
    that block i keeps `plan.heads[i]` heads and `plan.groups[i]` groups; the stock forward still runs."""
    blocks = list(model.transformer_blocks)
    if len(blocks) != len(plan.heads) or len(blocks) != len(plan.groups):
        raise ValueError(f"prune_static: the plan covers {len(plan.heads)} blocks, the model has {len(blocks)}")
    for i, block in enumerate(blocks):
        attn, fc1, fc2 = block.attn1, block.ff.net[0].proj, block.ff.net[2]
        hidden = fc1.out_features
        if attn.heads != plan.total_heads or hidden % plan.total_groups:
            raise ValueError(f"prune_static: block {i} has {attn.heads} heads and MLP width {hidden}; the plan "
                             f"needs {plan.total_heads} heads and a width divisible by {plan.total_groups}")
        head_dim = attn.to_q.out_features // attn.heads
        top = rank_units(head_parts(attn), attn.heads, norm)[:plan.heads[i]]
        index = (top[:, None] * head_dim + torch.arange(head_dim)).flatten()
        attn.to_q, attn.to_k, attn.to_v = (_select(p, index, True) for p in (attn.to_q, attn.to_k, attn.to_v))
        attn.to_out[0] = _select(attn.to_out[0], index, False)
        attn.heads = plan.heads[i]
        attn.inner_dim = attn.inner_kv_dim = plan.heads[i] * head_dim
        channels = rank_units([UnitSlice(fc1, True, 1), UnitSlice(fc2, False, 1)], hidden, norm)
        keep = channels[:plan.groups[i] * (hidden // plan.total_groups)]
        block.ff.net[0].proj = _select(fc1, keep, True)
        block.ff.net[2] = _select(fc2, keep, False)
    return model


def pruned_macs_ratio(model: nn.Module, *, image_tokens: int, text_tokens: int) -> float:
    """Analytic block MACs ratio of a (pruned) PixArt-α model against its config's full width (D = 4·C)."""
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    hidden = 4 * heads * head_dim
    blocks = list(model.transformer_blocks)
    shapes = [_shape(block, heads, head_dim, hidden, image_tokens, text_tokens) for block in blocks]
    kept = [block.attn1.to_q.out_features // head_dim for block in blocks]
    fractions = [Fraction(block.ff.net[0].proj.out_features, hidden) for block in blocks]
    return float(_ratio(shapes, kept, fractions))
