"""Two-step sampling through the stock diffusers pipelines with a given transformer (no encoders,
no VAE: fixed random prompt embeddings in, latents out), shared by the dynamic and fast-path tests."""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    LattePipeline,
    PixArtAlphaPipeline,
)
from torch import nn


def assert_latents_close(got: torch.Tensor, expected: torch.Tensor, relative: float) -> None:
    """Equal up to `relative` × the largest |latent|: a sampler amplifies the transformer's fp32
    reordering error along with the latents (DPM-Solver takes these random models to |x| ~ 500), so
    an absolute bound would depend on the machine's kernels rather than on the code."""
    torch.testing.assert_close(got, expected, atol=relative * expected.abs().max().item(), rtol=0)


def _text(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sample_two_steps(family: str, transformer: nn.Module, *, flux_size: int = 64) -> torch.Tensor:
    """Latents after 2 sampler steps of `family`'s pipeline (FLUX at flux_size², PixArt/Latte 64²)."""
    generator = torch.Generator().manual_seed(2)
    common = dict(num_inference_steps=2, output_type="latent", generator=generator)
    if family == "flux":
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt_embeds=_text(0, 1, 5, 32), pooled_prompt_embeds=_text(1, 1, 32), height=flux_size,
                    width=flux_size, guidance_scale=3.5, **common).images
    if family == "pixart":
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                   scheduler=DPMSolverMultistepScheduler())
        pipe.set_progress_bar_config(disable=True)
        mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
        return pipe(negative_prompt=None, prompt_embeds=_text(0, 1, 5, 32), prompt_attention_mask=mask,
                    negative_prompt_embeds=_text(1, 1, 5, 32), negative_prompt_attention_mask=mask,
                    guidance_scale=4.5, use_resolution_binning=False, **common).images
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                         scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe(negative_prompt=None, prompt_embeds=_text(0, 1, 5, 32), negative_prompt_embeds=_text(1, 1, 5, 32),
                video_length=4, height=64, width=64, guidance_scale=4.5, **common).frames
