"""DyLatte: the Latte video transformer (DDPM, T5 captions) with dynamic spatial and temporal blocks.

Both block kinds get their own head and group routers on e_t; the token router of each block
covers all F·S tokens of a clip (rows are frames in spatial blocks, positions in temporal blocks).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.latte_transformer_3d import LatteTransformer3DModel

from dydit_scale.config import DynamicConfig
from dydit_scale.models import tiny
from dydit_scale.models.convert import convert_stacks
from dydit_scale.models.dynamic_model import DynamicTransformerMixin
from dydit_scale.models.family import Family
from dydit_scale.models.pixart import DDPM_BETAS, T5_CAPTIONS, adaln_stack, adaln_timestep_embedding
from dydit_scale.models.replica import SD_VAE, Replica

__all__ = ["FAMILY", "DyLatteTransformer3DModel", "convert_latte"]


class DyLatteTransformer3DModel(DynamicTransformerMixin, LatteTransformer3DModel):
    """A `LatteTransformer3DModel` whose spatial and temporal blocks are dynamic (made by `make_dynamic`)."""

    def timestep_embedding(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        return FAMILY.timestep_embedding(self, timestep, batch)


def convert_latte(model: LatteTransformer3DModel, config: DynamicConfig) -> DyLatteTransformer3DModel:
    """Permute, then swap every spatial and temporal block for a `DyAdaLNTransformerBlock`, in place."""
    stacks = (adaln_stack("transformer_blocks", "latte_spatial"),
              adaln_stack("temporal_transformer_blocks", "latte_temporal"))
    return convert_stacks(model, config, stacks, DyLatteTransformer3DModel)


# maxin-cn/Latte-1/transformer/config.json: PixArt-α's width (16 heads × 72, T5 4096) with 28 spatial and
# 28 temporal blocks, 512² (sample_size 64), 16 frames; one weight file. Its scheduler is DDIM over the
# linear DDPM betas (no variance_type: LattePipeline then drops the learned-σ half before DDIM's
# step), its VAE sd-vae-ft-ema, its T5-XXL as PixArt's.
_LATTE_1 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                cross_attention_dim=1152, attention_bias=True, activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                norm_eps=1e-6, patch_size=2, caption_channels=4096, sample_size=64,
                video_length=16)
_LATTE_SCHEDULER = DDPM_BETAS | dict(clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                     timestep_spacing="linspace")


class LatteFamily(Family):
    """Latte-1: text-to-video, DDPM, T5 captions; the VAE encodes frame by frame."""

    name = "latte"
    objective = "ddpm"
    video = True
    transformer_class = LatteTransformer3DModel
    pipeline_class = "LattePipeline"
    samplers = {"ddim": "DDIMScheduler"}
    tiny_config = dict(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=32, video_length=4,
    )
    replicas = {
        "latte-1": Replica(name="latte-1", source="maxin-cn/Latte-1", transformer=_LATTE_1, depth_keys=("num_layers",),
                           default_layers=2, transformer_shards=1, vae=SD_VAE,
                           scheduler=("DDIMScheduler", _LATTE_SCHEDULER), text_encoders=T5_CAPTIONS),
    }

    def make_dynamic(self, model: torch.nn.Module, config: DynamicConfig) -> torch.nn.Module:
        return convert_latte(model, config)

    def timestep_embedding(self, model: torch.nn.Module, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        return adaln_timestep_embedding(model, timestep, batch)

    @torch.no_grad()
    def encode_text(self, pipe: Any, captions: list[str], *, max_tokens: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
        """LattePipeline's `encode_prompt` has no length argument and, with `mask_feature=False`,
        no mask: the T5 sequence as the pipeline passes it."""
        embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device,
                                       clean_caption=False, mask_feature=False)
        return {"prompt_embeds": embeds}

    def pipeline_kwargs(self, *, steps: int, height: int, width: int, guidance: float, text_tokens: int,
                        frames: int) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(steps=steps, height=height, width=width, guidance=guidance,
                                         text_tokens=text_tokens, frames=frames)
        return kwargs | {"video_length": frames}

    def tiny_pipeline(self, transformer: torch.nn.Module) -> Any:
        import diffusers

        t5_tok, t5 = tiny.t5_text_encoder(max_length=32)
        return diffusers.LattePipeline(tokenizer=t5_tok, text_encoder=t5, vae=tiny.vae(4, flux=False),
                                       transformer=transformer, scheduler=diffusers.DDIMScheduler())


FAMILY = LatteFamily()
