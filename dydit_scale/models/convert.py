"""`make_dynamic`: turn a diffusers transformer of a registered family into a DyDiT model.

Steps: check the model and the `dynamic:` config, rank and permute heads and MLP channels by
magnitude (function-preserving), replace each block by a dynamic block that owns the original
submodules (same state-dict keys, so checkpoints and LoRA files keep the diffusers names), and
switch the instance to a thin subclass whose forward computes the pure timestep embedding and then
runs the stock diffusers forward, so pipelines keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.importance import PermutedSpan
from dydit_scale.models.registry import all_families, family_of

__all__ = ["BlockStack", "convert_stacks", "make_dynamic"]


class BlockStack(NamedTuple):
    """One `nn.ModuleList` of blocks of a transformer and how to make its blocks dynamic."""

    attr: str
    """The attribute holding the blocks, e.g. `transformer_blocks`."""
    check: Callable[[nn.Module, DynamicConfig, str], None]
    """Raises a one-line error for a block variant the dynamic forward does not implement."""
    permute: Callable[[nn.Module, DynamicConfig, str], tuple[dict[str, torch.Tensor], list[PermutedSpan]]]
    """Ranks and permutes the block's units in place (function-preserving)."""
    dynamic: Callable[[nn.Module, DynamicConfig, str], nn.Module]
    """Builds the dynamic block that takes over the permuted block's submodules."""


def convert_stacks(model: nn.Module, config: DynamicConfig, stacks: tuple[BlockStack, ...],
                   dynamic_class: type) -> nn.Module:
    """Check every block first (nothing moves if one is unsupported), then permute each and swap it
    for its dynamic version, in place; `model` becomes a `dynamic_class`."""
    for stack in stacks:
        for index, block in enumerate(getattr(model, stack.attr)):
            stack.check(block, config, f"{stack.attr}.{index}")
    perms: dict[str, torch.Tensor] = {}
    spans: list[PermutedSpan] = []
    for stack in stacks:
        blocks = getattr(model, stack.attr)
        for index, block in enumerate(blocks):
            where = f"{stack.attr}.{index}"
            block_perms, block_spans = stack.permute(block, config, where)
            perms.update(block_perms)
            spans += block_spans
            blocks[index] = stack.dynamic(block, config, where)
    model.__class__ = dynamic_class
    model.dydit_config, model.dydit_permutations, model.dydit_spans = config, perms, spans
    return model


def make_dynamic(transformer: nn.Module, config: DynamicConfig | None = None) -> nn.Module:
    """Make `transformer` dynamic in place and return it (TDW heads and MLP groups, SDT tokens).

    A fresh result computes the same function as the stock model in train and eval mode (router
    biases start every head, group and token on). Permute before creating optimizer state or LoRA
    adapters, whose tensors would otherwise keep the old order; the permutations are in
    `model.dydit_permutations`.
    """
    family = family_of(transformer)
    if family is None or type(transformer) is not family.transformer_class:
        supported = ", ".join(f.transformer_class.__name__ for f in all_families())
        raise TypeError(f"make_dynamic: expected a diffusers {supported}, got {type(transformer).__name__}")
    training = transformer.training
    model = family.make_dynamic(transformer, config or DynamicConfig())
    return model.train(training)  # new routers follow the model's train/eval mode
