"""What the dynamic FLUX, PixArt-α and Latte models share: the per-forward e_t, router and FFN checks.

A dynamic transformer is the user's diffusers model whose class was switched to a thin subclass
(`DynamicTransformerMixin` + the diffusers class) and whose blocks were replaced by dynamic blocks
that own the original submodules. Its forward computes the pure timestep embedding e_t (never
pooled text, guidance or resolution embeddings: the routers must see the noise level, not the
prompt), hands it to every router and block through `broadcast_timestep` (so the TDW masks of the
whole forward are sampled once, before the blocks and outside activation checkpointing, and a
checkpointed recomputation sees the same masks), then runs the unchanged diffusers forward.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from torch import nn

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.importance import PermutedSpan
from dydit_scale.dynamic.routers import TimestepRouter, broadcast_timestep

__all__ = [
    "DynamicTransformerMixin",
    "check_feed_forward",
    "mlp_groups",
    "move_children",
    "stock_signature",
    "timestep_router",
]


@functools.cache
def stock_signature(cls: type) -> inspect.Signature:
    """Signature of the diffusers forward that `cls` (a dynamic subclass) extends, self included."""
    return inspect.signature(super(DynamicTransformerMixin, cls).forward)


class DynamicTransformerMixin:
    """Forward: e_t → `broadcast_timestep` → the stock diffusers forward (signature and return type kept).

    Attributes set by `make_dynamic`: `dydit_config` (the `dynamic:` section used),
    `dydit_permutations` ({"<block path>.heads" | ".mlp" | ".text_mlp": LongTensor}; entry i is the
    original index of the unit now at position i) and `dydit_spans` (which rows or columns of which
    Linear each permutation moved: files for other tools are written back in the base model's order).
    """

    dydit_config: DynamicConfig
    dydit_permutations: dict[str, torch.Tensor]
    dydit_spans: list[PermutedSpan]

    def timestep_embedding(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """The pure timestep embedding e_t [batch, C] that the TDW routers read."""
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = stock_signature(type(self)).bind(self, *args, **kwargs)
        hidden_states, timestep = bound.arguments["hidden_states"], bound.arguments["timestep"]
        broadcast_timestep(self, self.timestep_embedding(timestep, hidden_states.shape[0]))
        return super().forward(*args, **kwargs)


def move_children(source: nn.Module, target: nn.Module) -> None:
    """Register every child module and direct parameter of `source` on `target` (same names, same
    objects), so a dynamic block keeps the diffusers state-dict keys: base weights load and save in
    the stock layout."""
    for name, child in source.named_children():
        target.add_module(name, child)
    for name, param in source.named_parameters(recurse=False):
        target.register_parameter(name, param)
    for name, buffer in source.named_buffers(recurse=False):
        target.register_buffer(name, buffer)


def mlp_groups(config: DynamicConfig, heads: int, hidden: int, where: str) -> int:
    """Number of MLP channel groups G (config.mlp_groups, default G = H); D must split evenly."""
    groups = config.mlp_groups or heads
    if hidden % groups:
        raise ValueError(
            f"dynamic.mlp_groups: the MLP width {hidden} of {where} is not divisible by {groups} groups"
        )
    return groups


def timestep_router(width: int, units: int, config: DynamicConfig, like: torch.Tensor) -> TimestepRouter:
    """A TDW router on e_t [B, width] for `units` heads or groups, on the device/dtype of `like`."""
    router = TimestepRouter(width, units, tau=config.tau, bias=config.head_router_bias)
    return router.to(device=like.device, dtype=like.dtype)


def check_feed_forward(ff: nn.Module, where: str) -> None:
    """Masked FFNs support diffusers' FeedForward with a plain GELU (the FLUX/PixArt/Latte FFN)."""
    if not isinstance(ff, FeedForward) or not isinstance(ff.net[0], GELU):
        act = type(ff.net[0]).__name__ if isinstance(ff, FeedForward) else type(ff).__name__
        raise ValueError(f"make_dynamic: {where} must be a FeedForward with a GELU activation, got {act}")

