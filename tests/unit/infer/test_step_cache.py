"""cache-dit's step cache on the fast path: it reuses whole steps, and every step it computes runs that
step's masks."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtAlphaPipeline,
)
from infer_cases import dynamic_model
from pipeline_cases import assert_latents_close

from dydit_scale import apply_schedule, export_schedule
from dydit_scale.config import StepCacheConfig
from dydit_scale.infer.keys import sampler_time_keys
from dydit_scale.infer.step_cache import cache_problem, cached_steps, enable_step_cache, with_overrides
from dydit_scale.models.sit import SiTPipeline
from dydit_scale.models.tiny import tiny_transformer

pytest.importorskip("cache_dit")
STEPS = 6


def _text(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pipeline(family: str, transformer: torch.nn.Module) -> tuple[object, dict]:
    """The family's stock pipeline (no encoders) and the call arguments of one latent sample."""
    if family == "flux":
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        kwargs = dict(prompt_embeds=_text(0, 1, 5, 32), pooled_prompt_embeds=_text(1, 1, 32), height=64, width=64,
                      guidance_scale=3.5, output_type="latent")
    elif family == "pixart":
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                   scheduler=DPMSolverMultistepScheduler())
        mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
        kwargs = dict(negative_prompt=None, prompt_embeds=_text(0, 1, 5, 32), prompt_attention_mask=mask,
                      negative_prompt_embeds=_text(1, 1, 5, 32), negative_prompt_attention_mask=mask,
                      guidance_scale=4.5, use_resolution_binning=False, output_type="latent")
    else:
        pipeline, scheduler = ((DiTPipeline, DDIMScheduler()) if family == "dit"
                               else (SiTPipeline, FlowMatchEulerDiscreteScheduler()))
        torch.manual_seed(0)  # the same random VAE for every pipeline
        pipe = pipeline(transformer=transformer, vae=AutoencoderKL(), scheduler=scheduler)
        kwargs = dict(class_labels=[3], guidance_scale=4.0, output_type="np")
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def _sample(pipe: object, kwargs: dict) -> torch.Tensor:
    out = pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(2))
    return torch.as_tensor(out.images if hasattr(out, "images") else out)


def _fast(family: str, mode: str = "random") -> tuple[torch.nn.Module, torch.nn.Module]:
    masked = dynamic_model(family, mode)
    keys = sampler_time_keys(family, steps=STEPS, resolution=(64, 64))
    return masked, apply_schedule(copy.deepcopy(masked), export_schedule(masked, keys))


def _cache(threshold: float, mode: str = "dbcache", warmup: int = 2) -> StepCacheConfig:
    return StepCacheConfig(mode=mode, threshold=threshold, fn=1, bn=0, warmup=warmup)


@pytest.mark.parametrize("family", ["flux", "pixart", "dit", "sit"])
def test_a_cache_that_never_hits_samples_exactly_the_uncached_fast_path(family):
    _, fast = _fast(family)
    pipe, kwargs = _pipeline(family, fast)
    expected = _sample(pipe, kwargs)
    enable_step_cache(pipe, family, _cache(1e-9))
    assert torch.equal(_sample(pipe, kwargs), expected)
    assert cached_steps(fast) == []


@pytest.mark.parametrize("family", ["flux", "pixart"])
@pytest.mark.parametrize("mode", ["dbcache", "taylorseer"])
def test_cached_fast_path_samples_what_the_cached_masked_path_samples(family, mode):
    """Every step after the warm-up is reused; the steps that run (and the first blocks of the reused
    ones) must use that step's masks, as the masked model's routers decide them."""
    masked, fast = _fast(family)
    results = []
    for model in (masked, fast):
        pipe, kwargs = _pipeline(family, model)
        uncached = _sample(pipe, kwargs)
        enable_step_cache(pipe, family, _cache(100.0, mode, warmup=4))  # TaylorSeer's least
        results.append(_sample(pipe, kwargs))
        assert cached_steps(model) == [4, 5]
    assert_latents_close(results[1], results[0], 1e-5)
    assert not torch.allclose(results[1], uncached, atol=1e-3)  # the cache did change the sample


def test_taylorseer_extrapolates_where_dbcache_repeats():
    samples = {}
    for mode in ("dbcache", "taylorseer"):
        _, fast = _fast("pixart")
        pipe, kwargs = _pipeline("pixart", fast)
        enable_step_cache(pipe, "pixart", _cache(100.0, mode, warmup=4))
        samples[mode] = _sample(pipe, kwargs)
    assert not torch.allclose(samples["taylorseer"], samples["dbcache"], atol=1e-4)


def test_cached_dynamic_dit_with_every_unit_on_samples_what_cache_dit_gives_the_stock_dit():
    """Our DiT adapter (the forward pre-hook sets the masks, cache-dit's DiT patch hides block 0)
    against cache-dit's own registered adapter on the stock model."""
    import cache_dit

    _, fast = _fast("dit", "all_on")
    stock = tiny_transformer("dit").eval()
    pipe, kwargs = _pipeline("dit", stock)
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=100.0, max_warmup_steps=2))
    expected = _sample(pipe, kwargs)
    pipe, kwargs = _pipeline("dit", fast)
    enable_step_cache(pipe, "dit", _cache(100.0))
    torch.testing.assert_close(_sample(pipe, kwargs), expected, atol=1e-5, rtol=0)
    assert cached_steps(fast) == list(range(2, STEPS))


def test_unsupported_families_layouts_and_settings_are_one_line_errors(monkeypatch):
    _, fast = _fast("latte")
    with pytest.raises(ValueError, match="latte: cache-dit cannot cache this family: .*temporal") as err:
        enable_step_cache(fast, "latte", _cache(0.1))
    assert "\n" not in str(err.value)
    problem = cache_problem("pixart", {"transformer_blocks": 2}, StepCacheConfig(mode="dbcache"))
    assert problem.startswith("fn 8 + bn 0 blocks always run, but transformer_blocks has 2")
    assert cache_problem("pixart", {"transformer_blocks": 2}, StepCacheConfig()) is None  # mode none
    problem = cache_problem("pixart", {"transformer_blocks": 4}, _cache(0.1, "taylorseer", warmup=3))
    assert problem.startswith("warmup 3: taylorseer extrapolates from the steps computed before the first reuse "
                              "and needs at least 4 warm-up steps")
    with pytest.raises(ValueError, match=r"^cache threshold: Input should be greater than 0, got -1\.0$"):
        with_overrides(StepCacheConfig(), {"threshold": -1.0})
    monkeypatch.setitem(sys.modules, "cache_dit", None)
    _, fast = _fast("pixart")
    with pytest.raises(ValueError, match=r"cache-dit is not installed: pip install 'dydit_scale\[cache\]'"):
        enable_step_cache(fast, "pixart", _cache(0.1))
