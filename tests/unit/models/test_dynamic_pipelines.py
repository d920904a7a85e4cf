"""The stock diffusers pipelines run a fresh dynamic transformer unchanged and sample what the stock one does."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    LattePipeline,
    PixArtAlphaPipeline,
)
from dynamic_cases import stock_and_dynamic
from torch import nn


def _text(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _flux(transformer: nn.Module) -> torch.Tensor:
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=_text(0, 1, 5, 32), pooled_prompt_embeds=_text(1, 1, 32), height=32, width=32,
                num_inference_steps=2, guidance_scale=3.5, output_type="latent",
                generator=torch.Generator().manual_seed(2)).images


def _pixart(transformer: nn.Module) -> torch.Tensor:
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    return pipe(negative_prompt=None, prompt_embeds=_text(0, 1, 5, 32), prompt_attention_mask=mask,
                negative_prompt_embeds=_text(1, 1, 5, 32), negative_prompt_attention_mask=mask,
                num_inference_steps=2, guidance_scale=4.5, use_resolution_binning=False, output_type="latent",
                generator=torch.Generator().manual_seed(2)).images


def _latte(transformer: nn.Module) -> torch.Tensor:
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                         scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe(negative_prompt=None, prompt_embeds=_text(0, 1, 5, 32), negative_prompt_embeds=_text(1, 1, 5, 32),
                video_length=4, height=64, width=64, num_inference_steps=2, guidance_scale=4.5,
                output_type="latent", generator=torch.Generator().manual_seed(2)).frames


@pytest.mark.parametrize("family, sample", [("flux", _flux), ("pixart", _pixart), ("latte", _latte)])
def test_pipeline_with_dynamic_transformer_matches_stock_for_two_steps(family, sample):
    stock, dynamic = stock_and_dynamic(family)
    expected, got = sample(stock), sample(dynamic)
    # the samplers amplify the reordering error of the permuted sums on these random models
    torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
