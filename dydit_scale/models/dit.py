"""DyDiT: class-conditional DiT (DDPM, learned σ, adaLN-Zero), the papers' own setting.

Built on diffusers' `DiTTransformer2DModel` and `DiTPipeline`. Each diffusers DiT block carries its
own copy of the timestep + label embedder; the TDW routers read the pure timestep embedding e_t of
block 0's (all copies are equal), never e_t + e_y, so the masks depend on the timestep only.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.schedule import TokenShape
from dydit_scale.models import tiny
from dydit_scale.models.convert import convert_stacks
from dydit_scale.models.dynamic_model import DynamicTransformerMixin
from dydit_scale.models.family import Family
from dydit_scale.models.pixart import DDPM_BETAS, adaln_stack
from dydit_scale.models.replica import SD_VAE, Replica

__all__ = ["DIT_SCHEDULER", "FAMILY", "FREQ_SHIFT_KEY", "NULL_CLASS", "DiTFamily", "DyDiTTransformer2DModel",
           "dit_timestep_embedding"]

#: Private transformer config key (diffusers keeps it through from_pretrained / save_pretrained): the
#: `downscale_freq_shift` of the sinusoidal timestep features. diffusers' DiT class hard-codes 1; the
#: original DiT code, and so every checkpoint trained with it, uses 0 (frequencies exp(−ln 10⁴·i/half)).
FREQ_SHIFT_KEY = "_timestep_freq_shift"
#: The null class DiTPipeline feeds the unconditional half of classifier-free guidance.
NULL_CLASS = 1000


def dit_timestep_embedding(model: torch.nn.Module, timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """e_t = timestep_embedder(time_proj(t)) of block 0, without the label embedding.

    Mirrors the timestep branch of diffusers 0.42.1 `CombinedTimestepLabelEmbeddings.forward`.
    """
    emb = model.transformer_blocks[0].norm1.emb
    dtype = model.proj_out_2.weight.dtype
    e_t = emb.timestep_embedder(emb.time_proj(timestep.reshape(-1)).to(dtype))
    return e_t.expand(batch, -1) if e_t.shape[0] == 1 else e_t


class DyDiTTransformer2DModel(DynamicTransformerMixin, DiTTransformer2DModel):
    """A `DiTTransformer2DModel` whose blocks are dynamic (made by `make_dynamic`)."""

    def timestep_embedding(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        return dit_timestep_embedding(self, timestep, batch)


# The DiT paper's DiT-XL/2 at 256² (facebook/DiT-XL-2-256/transformer/config.json): 28 blocks,
# 1152 = 16 heads × 72, patch 2 on 32² latents of sd-vae-ft-ema, 1000 ImageNet classes, learned σ.
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                norm_elementwise_affine=False, norm_eps=1e-6, patch_size=2, sample_size=32)
# facebook/DiT-XL-2-256/scheduler/scheduler_config.json: DDIM over the linear DDPM betas.
DIT_SCHEDULER = DDPM_BETAS | dict(clip_sample=False, set_alpha_to_one=True, steps_offset=0)


class DiTFamily(Family):
    """DyDiT: class labels instead of captions; DDPM ε-prediction with learned σ (the ADM hybrid loss),
    DDIM / DPM-Solver sampling."""

    name = "dit"
    objective = "ddpm"
    samplers = {"ddim": "DDIMScheduler", "dpm_solver": "DPMSolverMultistepScheduler"}
    replicas = {
        "dit-xl-2-256": Replica(name="dit-xl-2-256", source="facebook/DiT-XL-2-256", transformer=DIT_XL_2,
                                depth_keys=("num_layers",), default_layers=2, transformer_shards=1, vae=SD_VAE,
                                scheduler=("DDIMScheduler", DIT_SCHEDULER)),
    }
    transformer_class = DiTTransformer2DModel
    pipeline_class = "DiTPipeline"
    aspect_buckets = False
    """DiT unpatchifies a square grid: train on centre crops, as DiT's ADM preprocessing does."""
    tiny_config = dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                       sample_size=8, patch_size=2, norm_num_groups=1, num_embeds_ada_norm=NULL_CLASS,
                       norm_eps=1e-6)
    """DiTPipeline's guidance feeds the null class 1000, so even the tiny model keeps 1000 classes."""

    def make_dynamic(self, model: torch.nn.Module, config: DynamicConfig) -> torch.nn.Module:
        return convert_stacks(model, config, (adaln_stack("transformer_blocks", "dit"),), DyDiTTransformer2DModel)

    def timestep_embedding(self, model: torch.nn.Module, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        return dit_timestep_embedding(model, timestep, batch)

    def configure_loaded(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply the checkpoint's own timestep-feature shift (see `FREQ_SHIFT_KEY`)."""
        shift = model.config.get(FREQ_SHIFT_KEY)
        if shift is not None:
            for block in model.transformer_blocks:
                block.norm1.emb.time_proj.downscale_freq_shift = float(shift)
        return model

    # --- training inputs -------------------------------------------------------------------------

    def batch_conditioning(self, pipe: Any, batch: dict[str, Any], *, max_tokens: int,
                           device: torch.device) -> dict[str, torch.Tensor]:
        """The batch's class labels; captioned shards are refused (the model has no text input)."""
        if "labels" not in batch:
            raise ValueError(f"data: the {self.name} family is class-conditional and needs shards with class "
                             "labels ({key}.cls, e.g. from `dydit-data pack --layout imagefolder`); got captions")
        labels = batch["labels"].long()
        if labels.numel() and int(labels.max()) >= NULL_CLASS:
            raise ValueError(f"data: class label {int(labels.max())} is out of range; the model has "
                             f"{NULL_CLASS} classes (0..{NULL_CLASS - 1})")
        return {"class_labels": labels}

    def transformer_inputs(self, transformer: torch.nn.Module, noisy: torch.Tensor, timestep: torch.Tensor,
                           text: dict[str, torch.Tensor], *, latent_hw: tuple[int, int],
                           guidance: float) -> dict[str, Any]:
        return dict(hidden_states=noisy, timestep=timestep, class_labels=text["class_labels"], return_dict=True)

    def example_inputs(self, config: Any, *, batch: int, text_tokens: int, generator: torch.Generator,
                       latent_hw: tuple[int, int] | None = None) -> dict[str, Any]:
        h, w = latent_hw or (config.sample_size, config.sample_size)
        return dict(hidden_states=torch.randn(batch, config.in_channels, h, w, generator=generator),
                    class_labels=torch.randint(0, config.num_embeds_ada_norm, (batch,), generator=generator))

    # --- sampling --------------------------------------------------------------------------------

    def pipeline_kwargs(self, *, steps: int, height: int, width: int, guidance: float, text_tokens: int,
                        frames: int) -> dict[str, Any]:
        """DiTPipeline samples at the transformer's own sample size: height and width do not apply."""
        return dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np")

    def prompt_arguments(self, pipe: Any, prompt: str) -> dict[str, Any]:
        """A prompt is a class index ("207") or a class name the pipeline knows (its `id2label`)."""
        text = str(prompt).strip()
        if text.isdigit() and int(text) < NULL_CLASS:
            return {"class_labels": [int(text)]}
        known = getattr(pipe, "labels", {}) or {}
        if text in known:
            return {"class_labels": [known[text]]}
        raise ValueError(f"validation.prompts: {prompt!r} is not a class index in 0..{NULL_CLASS - 1}"
                         + (" or a class name of the pipeline" if known else " (the pipeline has no class names)"))

    def token_shape(self, config: Any, *, resolution: tuple[int, int], vae_config: dict | None,
                    text_tokens: int, frames: int) -> TokenShape:
        """DiTPipeline always samples the transformer's sample size, with no text tokens."""
        return self.default_token_shape(config)

    def default_token_shape(self, config: Any) -> TokenShape:
        return TokenShape(image_tokens=(config.sample_size // config.patch_size) ** 2, text_tokens=0, frames=1)

    def tiny_pipeline(self, transformer: torch.nn.Module) -> Any:
        import diffusers

        return diffusers.DiTPipeline(transformer=transformer, vae=tiny.vae(4, flux=False),
                                     scheduler=diffusers.DDIMScheduler(**DIT_SCHEDULER))


FAMILY = DiTFamily()
