"""DyFLUX: FLUX.1 (flow matching, MMDiT) made dynamic: conversion of its double and single blocks.

TDW routers read e_t = timestep_embedder(time_proj(1000·σ)), never `temb`: FLUX adds pooled text and
guidance to `temb`, which would let the routers see the prompt instead of the noise level. The
DyFLUX token router may read `temb` because it stays live at inference.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformer2DModel,
    FluxTransformerBlock,
)
from torch import nn

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.importance import PermutedSpan, UnitSlice, permute_block
from dydit_scale.models.dynamic_model import DynamicTransformerMixin, check_feed_forward, mlp_groups
from dydit_scale.models.flux_blocks import DyFluxSingleTransformerBlock, DyFluxTransformerBlock

__all__ = ["DyFluxTransformer2DModel", "convert_flux"]


class DyFluxTransformer2DModel(DynamicTransformerMixin, FluxTransformer2DModel):
    """A `FluxTransformer2DModel` whose blocks are dynamic (made by `make_dynamic`)."""

    def timestep_embedding(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """e_t = timestep_embedder(time_proj(1000·σ)): FLUX's conditioning minus guidance and pooled text (P11)."""
        # Mirrors the timestep branch of diffusers 0.42.1 FluxTransformer2DModel.forward and
        # CombinedTimestep(Guidance)TextProjEmbeddings.forward.
        dtype = self.x_embedder.weight.dtype
        embed = self.time_text_embed
        e_t = embed.timestep_embedder(embed.time_proj(timestep.to(dtype).reshape(-1) * 1000).to(dtype))
        return e_t.expand(batch, -1) if e_t.shape[0] == 1 else e_t


def _check_attention(attn: FluxAttention, where: str) -> None:
    if type(attn.processor) is not FluxAttnProcessor or attn.fused_projections:
        raise ValueError(
            f"make_dynamic: {where} must use the default FluxAttnProcessor with unfused projections, "
            f"got {type(attn.processor).__name__} (fused={attn.fused_projections}); "
            "call unfuse_qkv_projections() / set_default_attn_processor() first"
        )


Permuted = tuple[dict[str, torch.Tensor], list[PermutedSpan]]


def _permute_double(block: FluxTransformerBlock, config: DynamicConfig, where: str) -> Permuted:
    """Rank and permute joint heads (image + text projections) and FFN channels (function-preserving)."""
    attn, units = block.attn, {}
    if config.heads:
        rows = [attn.to_q, attn.to_k, attn.to_v, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj]
        parts = [UnitSlice(p, True, attn.head_dim) for p in rows]
        parts += [UnitSlice(p, False, attn.head_dim) for p in (attn.to_out[0], attn.to_add_out)]
        units["heads"] = (parts, attn.heads)
    ffs = {"mlp": block.ff, **({"text_mlp": block.ff_context} if config.text_mlp else {})}
    for key, ff in ffs.items():
        fc1, fc2 = ff.net[0].proj, ff.net[2]
        units[key] = ([UnitSlice(fc1, True, 1), UnitSlice(fc2, False, 1)], fc1.out_features)
    return permute_block(block, units, config.importance_norm, where)


def _permute_single(block: FluxSingleTransformerBlock, config: DynamicConfig, where: str) -> Permuted:
    """Rank and permute heads and MLP channels; the fused proj_out columns move with both."""
    attn, units = block.attn, {}
    width = attn.heads * attn.head_dim
    if config.heads:
        parts = [UnitSlice(p, True, attn.head_dim) for p in (attn.to_q, attn.to_k, attn.to_v)]
        parts.append(UnitSlice(block.proj_out, False, attn.head_dim))
        units["heads"] = (parts, attn.heads)
    parts = [UnitSlice(block.proj_mlp, True, 1), UnitSlice(block.proj_out, False, 1, start=width)]
    units["mlp"] = (parts, block.proj_mlp.out_features)
    return permute_block(block, units, config.importance_norm, where)


def _check_block(block: nn.Module, config: DynamicConfig, where: str) -> None:
    """Every user-input problem is reported before any weight is permuted."""
    attn = block.attn
    _check_attention(attn, f"{where}.attn")
    if isinstance(block, FluxTransformerBlock):
        check_feed_forward(block.ff, f"{where}.ff")
        mlp_groups(config, attn.heads, block.ff.net[0].proj.out_features, f"{where}.ff")
        if config.text_mlp:
            check_feed_forward(block.ff_context, f"{where}.ff_context")
    else:
        if not isinstance(block.act_mlp, nn.GELU):
            raise ValueError(f"make_dynamic: {where}.act_mlp must be a GELU, got {type(block.act_mlp).__name__}")
        mlp_groups(config, attn.heads, block.proj_mlp.out_features, f"{where}.proj_mlp")


def convert_flux(model: FluxTransformer2DModel, config: DynamicConfig) -> DyFluxTransformer2DModel:
    """Permute, then swap every double and single block for its dynamic version, in place."""
    stacks = (
        ("transformer_blocks", _permute_double, DyFluxTransformerBlock),
        ("single_transformer_blocks", _permute_single, DyFluxSingleTransformerBlock),
    )
    for attr, _, _ in stacks:
        for index, block in enumerate(getattr(model, attr)):
            _check_block(block, config, f"{attr}.{index}")
    perms: dict[str, torch.Tensor] = {}
    spans: list[PermutedSpan] = []
    for attr, permute, dynamic in stacks:
        blocks = getattr(model, attr)
        for index, block in enumerate(blocks):
            block_perms, block_spans = permute(block, config, f"{attr}.{index}")
            perms.update(block_perms)
            spans += block_spans
            blocks[index] = dynamic(block, config, f"{attr}.{index}")
    model.__class__ = DyFluxTransformer2DModel
    model.dydit_config, model.dydit_permutations, model.dydit_spans = config, perms, spans
    return model
