"""The dit family: class prompts, the checkpoint's timestep-feature shift, and routers that read e_t only."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dynamic_cases import FULL_AT_INIT

from dydit_scale import make_dynamic
from dydit_scale.dynamic.routers import TimestepRouter
from dydit_scale.models.dit import FAMILY, FREQ_SHIFT_KEY
from dydit_scale.models.loading import load_transformer
from dydit_scale.models.tiny import tiny_pipeline, tiny_transformer


class _Pipe:
    labels = {"golden retriever": 207, "otter": 360}


def test_prompts_are_class_indices_or_names_the_pipeline_knows():
    assert FAMILY.prompt_arguments(_Pipe(), "207") == {"class_labels": [207]}
    assert FAMILY.prompt_arguments(_Pipe(), " otter ") == {"class_labels": [360]}
    with pytest.raises(ValueError, match=r"validation.prompts: 'a red circle' is not a class index in 0..999 or a class name"):
        FAMILY.prompt_arguments(_Pipe(), "a red circle")
    with pytest.raises(ValueError, match=r"'1000' is not a class index .*has no class names"):
        FAMILY.prompt_arguments(object(), "1000")


def _official_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """The original DiT's sinusoidal features: [cos, sin] of t · exp(−ln(10⁴)·i/half), i < half."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_the_freq_shift_key_makes_the_loaded_model_use_the_original_dit_features(tmp_path):
    stock = tiny_transformer("dit")
    stock.save_pretrained(tmp_path / "plain")
    stock.register_to_config(**{FREQ_SHIFT_KEY: 0})
    stock.save_pretrained(tmp_path / "shifted")
    assert json.loads((tmp_path / "shifted" / "config.json").read_text())[FREQ_SHIFT_KEY] == 0
    t = torch.tensor([0.0, 17.0, 999.0])
    plain, shifted = (load_transformer(tmp_path / name, "dit") for name in ("plain", "shifted"))
    proj = shifted.transformer_blocks[1].norm1.emb.time_proj
    torch.testing.assert_close(proj(t), _official_features(t), rtol=0, atol=2e-6)
    differs = plain.transformer_blocks[1].norm1.emb.time_proj(t) - _official_features(t)
    assert differs.abs().max() > 1e-2  # diffusers' own DiT features are not the original ones
    resaved = tmp_path / "resaved"
    shifted.save_pretrained(resaved)
    assert load_transformer(resaved, "dit").transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 0


def test_routers_read_the_timestep_embedding_not_the_class():
    """Same t, different labels: identical TDW masks (they are frozen per timestep into schedules)."""
    model = make_dynamic(tiny_transformer("dit"), FULL_AT_INIT).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, TimestepRouter)):
            router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=g))
            router.proj.bias.zero_()
        x = torch.randn(1, 4, 8, 8, generator=g).expand(3, -1, -1, -1)
        model(hidden_states=x, timestep=torch.tensor([500, 500, 500]), class_labels=torch.tensor([0, 5, 999]))
    routers = [m for m in model.modules() if isinstance(m, TimestepRouter)]
    assert any(not bool(r.decision.all()) for r in routers)  # some units switched off
    for router in routers:
        assert torch.equal(router.decision[0], router.decision[1]) and torch.equal(router.decision[0], router.decision[2])


def test_sampling_a_dynamic_dit_through_the_stock_pipeline_runs_guidance_with_the_null_class():
    pipe = tiny_pipeline("dit")
    pipe.transformer = make_dynamic(pipe.transformer, FULL_AT_INIT).eval()
    out = pipe(**FAMILY.prompt_arguments(pipe, "3"), generator=torch.Generator().manual_seed(0),
               **FAMILY.pipeline_kwargs(steps=2, height=0, width=0, guidance=4.0, text_tokens=0, frames=1))
    image = FAMILY.first_output(out)
    assert image.shape == (16, 16, 3) and torch.isfinite(torch.from_numpy(image)).all()
