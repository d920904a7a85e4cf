"""DyPixArt-α: PixArt-α (DDPM, T5 cross-attention, adaLN-single) with dynamic blocks."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel

from dydit_scale.config import DynamicConfig
from dydit_scale.models import tiny
from dydit_scale.models.adaln_block import BlockKind, DyAdaLNTransformerBlock, check_adaln_block, permute_adaln_block
from dydit_scale.models.convert import BlockStack, convert_stacks
from dydit_scale.models.dynamic_model import DynamicTransformerMixin
from dydit_scale.models.family import Family, vae_scale_factor
from dydit_scale.models.replica import SD_VAE, T5_XXL, Replica, TextEncoder

__all__ = ["DDPM_BETAS", "FAMILY", "T5_CAPTIONS", "DyPixArtTransformer2DModel", "adaln_stack", "adaln_timestep_embedding", "convert_pixart"]


def adaln_timestep_embedding(model: torch.nn.Module, timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """e_t = adaln_single.emb.timestep_embedder(time_proj(t)), without the resolution and aspect
    embeddings: the routers must see the noise level only.

    Mirrors the timestep branch of diffusers 0.42.1 `PixArtAlphaCombinedTimestepSizeEmbeddings.forward`.
    """
    emb = model.adaln_single.emb
    dtype = model.proj_out.weight.dtype
    e_t = emb.timestep_embedder(emb.time_proj(timestep.reshape(-1)).to(dtype))
    return e_t.expand(batch, -1) if e_t.shape[0] == 1 else e_t


class DyPixArtTransformer2DModel(DynamicTransformerMixin, PixArtTransformer2DModel):
    """A `PixArtTransformer2DModel` whose blocks are dynamic (made by `make_dynamic`)."""

    def timestep_embedding(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        return FAMILY.timestep_embedding(self, timestep, batch)


def adaln_stack(attr: str, kind: BlockKind) -> BlockStack:
    """A stack of ada_norm_single `BasicTransformerBlock`s (PixArt-α, Latte) made `kind` dynamic blocks."""
    return BlockStack(attr, check_adaln_block, permute_adaln_block,
                      lambda block, config, where: DyAdaLNTransformerBlock(block, config, kind, where))


def convert_pixart(model: PixArtTransformer2DModel, config: DynamicConfig) -> DyPixArtTransformer2DModel:
    """Permute, then swap every block for a `DyAdaLNTransformerBlock`, in place."""
    return convert_stacks(model, config, (adaln_stack("transformer_blocks", "pixart"),), DyPixArtTransformer2DModel)


# PixArt-alpha/PixArt-XL-2-1024-MS/transformer/config.json: DiT-XL width (28 blocks, 1152 = 16 heads × 72),
# T5 captions of 4096, adaLN-single; 1024-MS has sample_size 128 and the resolution / aspect-ratio
# conditions, PixArt-XL-2-512x512 sample_size 64 without them. One weight file.
_PIXART_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                  cross_attention_dim=1152, attention_bias=True, activation_fn="gelu-approximate",
                  num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                  norm_eps=1e-6, norm_num_groups=32, patch_size=2, caption_channels=4096, sample_size=128,
                  use_additional_conditions=True)
# PixArt-XL-2-1024-MS/scheduler/scheduler_config.json: DPM-Solver++ (2M) over the linear DDPM betas.
DDPM_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon")
_PIXART_SCHEDULER = DDPM_BETAS | dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                      lower_order_final=True, timestep_spacing="linspace")
# PixArt's text_encoder is T5-XXL in 4 shards; its pipeline cuts captions at 120 tokens.
T5_CAPTIONS = {"text_encoder": TextEncoder("t5", T5_XXL, {"model_max_length": 120}, shards=4)}


def _pixart_replica(name: str, source: str, sample_size: int) -> Replica:
    return Replica(name=name, source=source,
                   transformer=_PIXART_XL | dict(sample_size=sample_size, use_additional_conditions=sample_size == 128),
                   depth_keys=("num_layers",), default_layers=2, transformer_shards=1, vae=SD_VAE,
                   scheduler=("DPMSolverMultistepScheduler", _PIXART_SCHEDULER), text_encoders=T5_CAPTIONS)


def size_conditions(config: Any, batch: int, latent_hw: tuple[int, int], dtype: torch.dtype,
                    device: torch.device) -> dict[str, torch.Tensor | None]:
    """The resolution / aspect-ratio micro-conditions PixArt-α 1024-MS was trained with, in pixels, as
    `PixArtAlphaPipeline` passes them; models without them take None."""
    if not config.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    height, width = (side * vae_scale_factor(None) for side in latent_hw)
    resolution = torch.tensor([[height, width]], dtype=dtype, device=device).expand(batch, 2)
    aspect = torch.tensor([[height / width]], dtype=dtype, device=device).expand(batch, 1)
    return {"resolution": resolution, "aspect_ratio": aspect}


class PixArtFamily(Family):
    """PixArt-α: DDPM ε-prediction with learned σ, T5 captions with an attention mask."""

    name = "pixart"
    objective = "ddpm"
    transformer_class = PixArtTransformer2DModel
    pipeline_class = "PixArtAlphaPipeline"
    samplers = {"dpm_solver": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}
    tiny_config = dict(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=8, patch_size=2, norm_num_groups=1,
        caption_channels=32, use_additional_conditions=False, norm_type="ada_norm_single",
    )
    replicas = {
        "pixart-alpha-1024": _pixart_replica("pixart-alpha-1024", "PixArt-alpha/PixArt-XL-2-1024-MS", 128),
        "pixart-alpha-512": _pixart_replica("pixart-alpha-512", "PixArt-alpha/PixArt-XL-2-512x512", 64),
    }

    def make_dynamic(self, model: torch.nn.Module, config: DynamicConfig) -> torch.nn.Module:
        return convert_pixart(model, config)

    def timestep_embedding(self, model: torch.nn.Module, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        return adaln_timestep_embedding(model, timestep, batch)

    def transformer_inputs(self, transformer: torch.nn.Module, noisy: torch.Tensor, timestep: torch.Tensor,
                           text: dict[str, torch.Tensor], *, latent_hw: tuple[int, int],
                           guidance: float) -> dict[str, Any]:
        kwargs = super().transformer_inputs(transformer, noisy, timestep, text, latent_hw=latent_hw,
                                            guidance=guidance)
        return kwargs | {"added_cond_kwargs": size_conditions(transformer.config, noisy.shape[0], latent_hw,
                                                              noisy.dtype, noisy.device)}

    def example_inputs(self, config: Any, *, batch: int, text_tokens: int, generator: torch.Generator,
                       latent_hw: tuple[int, int] | None = None) -> dict[str, Any]:
        inputs = super().example_inputs(config, batch=batch, text_tokens=text_tokens, generator=generator,
                                        latent_hw=latent_hw)
        latent_hw = latent_hw or (config.sample_size, config.sample_size)
        return inputs | {"added_cond_kwargs": size_conditions(config, batch, latent_hw, torch.float32,
                                                              torch.device("cpu"))}

    def pipeline_kwargs(self, *, steps: int, height: int, width: int, guidance: float, text_tokens: int,
                        frames: int) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(steps=steps, height=height, width=width, guidance=guidance,
                                         text_tokens=text_tokens, frames=frames)
        return kwargs | {"use_resolution_binning": False, "max_sequence_length": text_tokens}

    def tiny_pipeline(self, transformer: torch.nn.Module) -> Any:
        import diffusers

        t5_tok, t5 = tiny.t5_text_encoder(max_length=32)
        return diffusers.PixArtAlphaPipeline(tokenizer=t5_tok, text_encoder=t5, vae=tiny.vae(4, flux=False),
                                             transformer=transformer,
                                             scheduler=diffusers.DPMSolverMultistepScheduler())


FAMILY = PixArtFamily()
