"""DyFLUX: FLUX.1 (flow matching, MMDiT) made dynamic: conversion of its double and single blocks.

TDW routers read e_t = timestep_embedder(time_proj(1000·σ)), never `temb`: FLUX adds pooled text and
guidance to `temb`, which would let the routers see the prompt instead of the noise level. The
DyFLUX token router may read `temb` because it stays live at inference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
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
from dydit_scale.dynamic.schedule import TokenShape
from dydit_scale.models import tiny
from dydit_scale.models.convert import BlockStack, convert_stacks
from dydit_scale.models.dynamic_model import DynamicTransformerMixin, check_feed_forward, mlp_groups
from dydit_scale.models.family import Family, vae_scale_factor
from dydit_scale.models.replica import CLIP_L, FLUX_VAE, T5_XXL, Replica, TextEncoder
from dydit_scale.models.flux_blocks import DyFluxSingleTransformerBlock, DyFluxTransformerBlock

__all__ = ["FAMILY", "DyFluxTransformer2DModel", "convert_flux", "flux_image_ids", "pack_flux_latents"]


class DyFluxTransformer2DModel(DynamicTransformerMixin, FluxTransformer2DModel):
    """A `FluxTransformer2DModel` whose blocks are dynamic (made by `make_dynamic`)."""

    def timestep_embedding(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        return FAMILY.timestep_embedding(self, timestep, batch)


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
    stacks = (BlockStack("transformer_blocks", _check_block, _permute_double, DyFluxTransformerBlock),
              BlockStack("single_transformer_blocks", _check_block, _permute_single, DyFluxSingleTransformerBlock))
    return convert_stacks(model, config, stacks, DyFluxTransformer2DModel)


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2·W/2, 4C]: FLUX's 2×2 patch packing (as diffusers' FluxPipeline)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def flux_image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """RoPE position ids [h·w, 3] = (0, row, col) of the packed latent grid."""
    ids = torch.zeros(height, width, 3, device=device)
    ids[..., 1] = torch.arange(height, device=device)[:, None]
    ids[..., 2] = torch.arange(width, device=device)[None, :]
    return ids.reshape(-1, 3)


def _latent_grid(resolution: tuple[int, int], vae_config: dict | None) -> tuple[int, int]:
    """Unpacked latent height and width at `resolution`, rounded as FluxPipeline rounds them."""
    vae_scale = vae_scale_factor(vae_config)
    height, width = (2 * (int(side) // (vae_scale * 2)) for side in resolution)
    return height, width


# black-forest-labs/FLUX.1-dev/transformer/config.json (19 double + 38 single blocks, 24 heads × 128,
# joint attention from T5's 4096, pooled CLIP 768, RoPE axes 16 + 56 + 56 = 128); 3 weight shards.
_FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# FLUX.1-dev/scheduler/scheduler_config.json; schnell's has shift 1 and no dynamic shifting.
_FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# FLUX.1-*/text_encoder (CLIP-L, one file; tokenizer pads with <|endoftext|>) and text_encoder_2
# (T5-XXL in 2 shards; tokenizer_2 model_max_length 512).
_FLUX_TEXT = {
    "text_encoder": TextEncoder("clip", CLIP_L, {"model_max_length": 77, "pad_token": "<|endoftext|>"}),
    "text_encoder_2": TextEncoder("t5", T5_XXL, {"model_max_length": 512}, shards=2),
}


def _flux_replica(name: str, guidance: bool, scheduler: dict[str, Any]) -> Replica:
    return Replica(name=name, source=f"black-forest-labs/FLUX.1-{name.split('-')[1]}",
                   transformer=_FLUX_DEV | {"guidance_embeds": guidance},
                   depth_keys=("num_layers", "num_single_layers"), default_layers=1, transformer_shards=3,
                   vae=FLUX_VAE, scheduler=("FlowMatchEulerDiscreteScheduler", scheduler), text_encoders=_FLUX_TEXT)


class FluxFamily(Family):
    """FLUX.1: flow matching, packed 2×2 latents, CLIP pooled + T5 text, guidance embedding."""

    name = "flux"
    objective = "flow"
    transformer_class = FluxTransformer2DModel
    pipeline_class = "FluxPipeline"
    samplers = {"flow_euler": "FlowMatchEulerDiscreteScheduler"}
    time_key_definition = "flux_sigma: σ ∈ (0, 1] as FluxPipeline passes it (timestep / 1000); the transformer embeds 1000·σ"
    tiny_config = dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    replicas = {
        "flux-dev": _flux_replica("flux-dev", True, _FLUX_SCHEDULER),
        # FLUX.1-schnell: guidance-distilled away (no guidance embedder), 4-step sampling without shift.
        "flux-schnell": _flux_replica("flux-schnell", False,
                                      _FLUX_SCHEDULER | {"shift": 1.0, "use_dynamic_shifting": False}),
    }

    def make_dynamic(self, model: nn.Module, config: DynamicConfig) -> nn.Module:
        return convert_flux(model, config)

    def timestep_embedding(self, model: nn.Module, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """e_t = timestep_embedder(time_proj(1000·σ)): FLUX's conditioning minus guidance and pooled text."""
        # Mirrors the timestep branch of diffusers 0.42.1 FluxTransformer2DModel.forward and
        # CombinedTimestep(Guidance)TextProjEmbeddings.forward.
        dtype = model.x_embedder.weight.dtype
        embed = model.time_text_embed
        e_t = embed.timestep_embedder(embed.time_proj(timestep.to(dtype).reshape(-1) * 1000).to(dtype))
        return e_t.expand(batch, -1) if e_t.shape[0] == 1 else e_t

    def scale_latents(self, vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
        """Shifted, scaled and packed [B, N, 4C], as FluxPipeline's latents."""
        return pack_flux_latents((latents - vae_config.shift_factor) * vae_config.scaling_factor)

    @torch.no_grad()
    def encode_text(self, pipe: Any, captions: list[str], *, max_tokens: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=device,
                                               max_sequence_length=max_tokens)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def transformer_inputs(self, transformer: nn.Module, noisy: torch.Tensor, timestep: torch.Tensor,
                           text: dict[str, torch.Tensor], *, latent_hw: tuple[int, int],
                           guidance: float) -> dict[str, Any]:
        h, w = latent_hw
        kwargs = dict(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text["prompt_embeds"],
                      pooled_projections=text["pooled_prompt_embeds"],
                      img_ids=flux_image_ids(h // 2, w // 2, noisy.device),
                      txt_ids=torch.zeros(text["prompt_embeds"].shape[1], 3, device=noisy.device),
                      return_dict=True)
        if transformer.config.guidance_embeds:
            kwargs["guidance"] = torch.full((noisy.shape[0],), guidance, device=noisy.device)
        return kwargs

    def example_inputs(self, config: Any, *, batch: int, text_tokens: int, generator: torch.Generator,
                       latent_hw: tuple[int, int] | None = None) -> dict[str, Any]:
        """Packed latents of an 8×8 latent grid unless `latent_hw` (unpacked) says otherwise."""
        h, w = latent_hw or (8, 8)
        inputs = dict(
            hidden_states=torch.randn(batch, (h // 2) * (w // 2), config.in_channels, generator=generator),
            encoder_hidden_states=torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
            pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=generator),
            img_ids=flux_image_ids(h // 2, w // 2, torch.device("cpu")), txt_ids=torch.zeros(text_tokens, 3))
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5)
        return inputs

    def time_keys(self, scheduler: Any, *, steps: int, resolution: tuple[int, int], vae_config: dict | None,
                  dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, Any]]:
        """σ's from `np.linspace(1, 1/N, N)`, shifted by μ(image tokens) under dynamic shifting; the
        transformer receives `t.to(dtype) / 1000`. Mirrors diffusers 0.42.1 `FluxPipeline.__call__`."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        height, width = _latent_grid(resolution, vae_config)
        image_seq_len = (height // 2) * (width // 2)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if hasattr(scheduler.config, "use_flow_sigmas") and scheduler.config.use_flow_sigmas:
            sigmas = None
        config = scheduler.config
        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        return timesteps.to(dtype) / 1000, {"mu": mu, "image_tokens": image_seq_len}

    def token_shape(self, config: Any, *, resolution: tuple[int, int], vae_config: dict | None,
                    text_tokens: int, frames: int) -> TokenShape:
        height, width = _latent_grid(resolution, vae_config)
        return TokenShape(image_tokens=(height // 2) * (width // 2), text_tokens=text_tokens)

    def default_token_shape(self, config: Any) -> TokenShape:
        """1024² with 512 T5 tokens, FLUX.1's usual sampling shape."""
        return TokenShape(image_tokens=4096, text_tokens=512)

    def pipeline_kwargs(self, *, steps: int, height: int, width: int, guidance: float, text_tokens: int,
                        frames: int) -> dict[str, Any]:
        return dict(num_inference_steps=steps, height=height, width=width, guidance_scale=guidance,
                    output_type="np", max_sequence_length=text_tokens)

    def tiny_pipeline(self, transformer: nn.Module) -> Any:
        import diffusers

        clip_tok, clip = tiny.clip_text_encoder()
        t5_tok, t5 = tiny.t5_text_encoder(max_length=32)
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny.vae(4, flux=True),
            text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
        )


FAMILY = FluxFamily()
