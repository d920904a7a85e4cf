"""Sampler time keys: what the diffusers pipelines pass to the transformer."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from dydit_scale.infer.keys import build_scheduler, sampler_time_keys


def test_flux_keys_reproduce_the_1024px_28_step_example(tmp_path):
    scheduler = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    keys = sampler_time_keys("flux", steps=28, resolution=(1024, 1024), pipeline=tmp_path)
    t = (keys.values.double() * 1000).tolist()
    assert keys.values.dtype == torch.float32 and len(t) == 28
    assert [round(v, 1) for v in t[:3] + t[-2:]] == [1000.0, 988.4, 976.2, 195.5, 104.7]
    assert keys.sampler["mu"] == pytest.approx(1.15)
    assert build_scheduler(keys.sampler).config.use_dynamic_shifting


@pytest.mark.parametrize("family, sampler, cls", [("pixart", "dpm_solver", DPMSolverMultistepScheduler),
                                                  ("pixart", "ddim", DDIMScheduler), ("latte", "ddim", DDIMScheduler)])
def test_ddpm_keys_are_the_schedulers_timesteps(family, sampler, cls):
    keys = sampler_time_keys(family, steps=5, resolution=(256, 256), sampler=sampler)
    reference = cls()
    reference.set_timesteps(5)
    assert torch.equal(keys.values, reference.timesteps)


def test_unknown_sampler_is_an_error():
    with pytest.raises(ValueError, match="latte supports ddim"):
        sampler_time_keys("latte", steps=5, resolution=(256, 256), sampler="dpm_solver")
