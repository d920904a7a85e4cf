"""`Family`: everything the rest of the system asks about one model family, in one record.

Each family module (`models/flux.py`, `pixart.py`, `latte.py`, `dit.py`, `sit.py`) defines a subclass
and one instance `FAMILY`; `models/registry.py` lists the modules. The trainer, validation, sampling,
export, time keys, loading and the tiny models ask only this record, so a new family is one new
file plus one registry line.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.schedule import TokenShape
from dydit_scale.models.replica import Replica

__all__ = ["Family", "vae_scale_factor"]


def vae_scale_factor(vae_config: dict[str, Any] | None) -> int:
    """Pixels per latent cell, as diffusers pipelines compute it (8 when the folder has no VAE config)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config else 8


class Family:
    """One model family: its stock classes, conversion, encoding, conditioning, samplers and sizes.

    The defaults are those of the DDPM families with T5 captions (PixArt-α, Latte); FLUX overrides
    what flow matching and joint attention change.
    """

    name: ClassVar[str]
    objective: ClassVar[Literal["flow", "ddpm"]]
    video: ClassVar[bool] = False
    transformer_class: ClassVar[type[nn.Module]]
    """The stock diffusers transformer class this family converts."""
    pipeline_class: ClassVar[str]
    """The diffusers pipeline class name that loads a whole folder of this family."""
    samplers: ClassVar[dict[str, str]]
    """Sampler name -> diffusers scheduler class name; the first is the pipeline's default."""
    time_key_definition: ClassVar[str] = "ddpm_index: the scheduler's integer timestep in [0, num_train_timesteps)"
    """What the `timestep` scalar the pipeline passes means, recorded with the time keys."""
    tiny_config: ClassVar[dict[str, Any]]
    """Constructor arguments of a tiny random-init transformer (tests and the CPU demo)."""
    aspect_buckets: ClassVar[bool] = True
    """Whether training batches may be non-square aspect-ratio buckets (else centre crops of resolution²)."""
    replicas: ClassVar[dict[str, Replica]] = {}
    """The released pipelines of this family at their real widths (`dydit-data synth --replica`)."""

    def pipeline_type(self) -> type:
        """The pipeline class itself (diffusers', unless the family brings its own)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def make_dynamic(self, model: nn.Module, config: DynamicConfig) -> nn.Module:
        """Permute, then swap every block for its dynamic version, in place."""
        raise NotImplementedError

    def timestep_embedding(self, model: nn.Module, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """The pure timestep embedding e_t [batch, C] the TDW routers read (no text, guidance or size)."""
        raise NotImplementedError

    def configure_loaded(self, model: nn.Module) -> nn.Module:
        """Settings a loaded transformer's config records but its diffusers class does not apply."""
        return model

    # --- training inputs -------------------------------------------------------------------------

    def scale_latents(self, vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> what the transformer sees."""
        return latents * vae_config.scaling_factor

    @torch.no_grad()
    def encode_pixels(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> transformer latents; videos [B,3,F,H,W] are encoded frame by frame,
        as Latte's pipeline decodes them."""
        if self.video:
            b, _, f, h, w = pixels.shape
            frames = pixels.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
            latents = vae.encode(frames.to(vae.dtype)).latent_dist.sample()
            latents = latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)
        else:
            latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample()
        return self.scale_latents(vae.config, latents)

    @torch.no_grad()
    def encode_text(self, pipe: Any, captions: list[str], *, max_tokens: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
        """Caption embeddings through the pipeline's own `encode_prompt`, exactly as at sampling time."""
        embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device,
                                                clean_caption=False, max_sequence_length=max_tokens)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def batch_conditioning(self, pipe: Any, batch: dict[str, Any], *, max_tokens: int,
                           device: torch.device) -> dict[str, torch.Tensor]:
        """The conditioning of a loader batch (its tensors already on `device`): stored text embeddings
        of a pre-encoded batch, else the captions through `encode_text`."""
        if "labels" in batch:
            raise ValueError(f"data: the {self.name} family is text-conditioned, but the shards hold class "
                             "labels (.cls); use captioned shards (.txt) or the class-conditional dit family")
        if "latents" not in batch:
            return self.encode_text(pipe, batch["captions"], max_tokens=max_tokens, device=device)
        text = {"prompt_embeds": batch["text_embeds"]}
        if "pooled_embeds" in batch:
            text["pooled_prompt_embeds"] = batch["pooled_embeds"]
        if "text_mask" in batch:
            text["prompt_attention_mask"] = batch["text_mask"].long()
        return text

    def transformer_inputs(self, transformer: nn.Module, noisy: torch.Tensor, timestep: torch.Tensor,
                           text: dict[str, torch.Tensor], *, latent_hw: tuple[int, int],
                           guidance: float) -> dict[str, Any]:
        """Keyword arguments of the diffusers transformer's forward for one training batch.

        `latent_hw` is the (unpacked) latent height and width; `text` comes from `encode_text`.
        """
        return dict(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text["prompt_embeds"],
                    encoder_attention_mask=text.get("prompt_attention_mask"), return_dict=True)

    def example_inputs(self, config: Any, *, batch: int, text_tokens: int, generator: torch.Generator,
                       latent_hw: tuple[int, int] | None = None) -> dict[str, Any]:
        """Random transformer inputs (no timestep) at the config's sample size, for benchmarks."""
        h, w = latent_hw or (config.sample_size, config.sample_size)
        frames = (config.video_length,) if self.video else ()
        return dict(hidden_states=torch.randn(batch, config.in_channels, *frames, h, w, generator=generator),
                    encoder_hidden_states=torch.randn(batch, text_tokens, config.caption_channels, generator=generator))

    # --- sampling --------------------------------------------------------------------------------

    def pipeline_kwargs(self, *, steps: int, height: int, width: int, guidance: float, text_tokens: int,
                        frames: int) -> dict[str, Any]:
        """Keyword arguments of the family's pipeline call for one sample (numpy output). Captions are
        used as written: the pipelines' caption cleaning needs optional packages and changes prompts."""
        return dict(num_inference_steps=steps, height=height, width=width, guidance_scale=guidance,
                    output_type="np", clean_caption=False)

    def prompt_arguments(self, pipe: Any, prompt: str) -> dict[str, Any]:
        """The pipeline call's conditioning argument for one validation or sampling prompt."""
        return {"prompt": prompt}

    def first_output(self, result: Any) -> np.ndarray:
        """The first image [H, W, 3] (a video: its frames [F, H, W, 3]) of a pipeline result."""
        return np.asarray(result.frames[0] if self.video else result.images[0], dtype=np.float32)

    def time_keys(self, scheduler: Any, *, steps: int, resolution: tuple[int, int], vae_config: dict | None,
                  dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, Any]]:
        """The `timestep` values the pipeline passes for `steps` steps, and extra facts to record."""
        scheduler.set_timesteps(steps, device="cpu")
        return scheduler.timesteps.clone(), {}

    def token_shape(self, config: Any, *, resolution: tuple[int, int], vae_config: dict | None,
                    text_tokens: int, frames: int) -> TokenShape:
        """Image / text tokens (and frames) the transformer sees when sampling at `resolution`."""
        vae_scale = vae_scale_factor(vae_config)
        height, width = (int(side) // vae_scale // config.patch_size for side in resolution)
        return TokenShape(image_tokens=height * width, text_tokens=text_tokens, frames=frames if self.video else 1)

    def default_token_shape(self, config: Any) -> TokenShape:
        """The usual sampling shape: the config's sample size with 120 T5 tokens."""
        tokens = (config.sample_size // config.patch_size) ** 2
        return TokenShape(image_tokens=tokens, text_tokens=120, frames=config.get("video_length") or 1)

    def tiny_pipeline(self, transformer: nn.Module) -> Any:
        """A whole random-init pipeline around the tiny `transformer` (tiny VAE, text encoders)."""
        raise NotImplementedError
