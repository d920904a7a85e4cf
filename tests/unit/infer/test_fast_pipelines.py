"""The stock diffusers pipelines run the fast transformer and sample what the masked one samples."""

from __future__ import annotations

import copy

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
from infer_cases import dynamic_model
from torch import nn

from dydit_scale import apply_schedule, export_schedule
from dydit_scale.infer.keys import sampler_time_keys


def _text(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _flux(transformer: nn.Module) -> torch.Tensor:
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=_text(0, 1, 5, 32), pooled_prompt_embeds=_text(1, 1, 32), height=64, width=64,
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
def test_pipeline_with_fast_transformer_matches_masked_for_two_steps(family, sample):
    masked = dynamic_model(family, "random")
    keys = sampler_time_keys(family, steps=2, resolution=(64, 64))  # default scheduler configs, as above
    fast = apply_schedule(copy.deepcopy(masked), export_schedule(masked, keys))
    fast.dydit_fast.token_log = []
    expected, got = sample(masked), sample(fast)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)  # fp32, reordered sums only
    assert len(fast.dydit_fast.token_log) == 2  # one forward per step, CFG halves in one batch
