"""What differs between FLUX, PixArt-α and Latte during training, as one small record per family.

The trainer stays family-agnostic: it asks the family how to turn pixels into latents, how to call
the transformer on noisy latents, and how to read the prediction back (architecture §2.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class Family:
    """Facts about one model family."""

    name: Literal["flux", "pixart", "latte"]
    objective: Literal["flow", "ddpm"]
    video: bool


FAMILIES: dict[str, Family] = {
    "flux": Family("flux", "flow", video=False),
    "pixart": Family("pixart", "ddpm", video=False),
    "latte": Family("latte", "ddpm", video=True),
}


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


def scale_latents(family: Family, vae_config: Any, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> what the transformer sees: scaled (FLUX: shifted, scaled and packed [B,N,4C])."""
    if family.name == "flux":
        return pack_flux_latents((latents - vae_config.shift_factor) * vae_config.scaling_factor)
    return latents * vae_config.scaling_factor


@torch.no_grad()
def encode_pixels(family: Family, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> transformer latents: images [B,3,H,W] -> [B,C,h,w] (FLUX packed [B,N,4C]);
    videos [B,3,F,H,W] -> [B,C,F,h,w], frames encoded independently as in Latte."""
    if family.video:
        b, _, f, h, w = pixels.shape
        frames = pixels.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
        latents = vae.encode(frames.to(vae.dtype)).latent_dist.sample()
        latents = latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)
    else:
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample()
    return scale_latents(family, vae.config, latents)


def transformer_inputs(family: Family, transformer: torch.nn.Module, noisy: torch.Tensor,
                       timestep: torch.Tensor, text: dict[str, torch.Tensor], *,
                       latent_hw: tuple[int, int], guidance: float) -> dict[str, Any]:
    """Keyword arguments of the diffusers transformer's forward for one training batch.

    `latent_hw` is the (unpacked) latent height and width; `text` comes from `encoders.encode_text`.
    """
    batch = noisy.shape[0]
    if family.name == "flux":
        h, w = latent_hw
        kwargs = dict(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text["prompt_embeds"],
                      pooled_projections=text["pooled_prompt_embeds"],
                      img_ids=flux_image_ids(h // 2, w // 2, noisy.device),
                      txt_ids=torch.zeros(text["prompt_embeds"].shape[1], 3, device=noisy.device),
                      return_dict=True)
        if transformer.config.guidance_embeds:
            kwargs["guidance"] = torch.full((batch,), guidance, device=noisy.device)
        return kwargs
    kwargs = dict(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text["prompt_embeds"],
                  encoder_attention_mask=text.get("prompt_attention_mask"), return_dict=True)
    if family.name == "pixart":
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return kwargs
