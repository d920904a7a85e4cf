"""The stock diffusers pipelines run the fast transformer and sample what the masked one samples."""

from __future__ import annotations

import copy

import pytest
from infer_cases import dynamic_model
from pipeline_cases import assert_latents_close, sample_two_steps

from dydit_scale import apply_schedule, export_schedule
from dydit_scale.infer.keys import sampler_time_keys


@pytest.mark.parametrize("family", ["flux", "pixart", "latte"])
def test_pipeline_with_fast_transformer_matches_masked_for_two_steps(family):
    masked = dynamic_model(family, "random")
    keys = sampler_time_keys(family, steps=2, resolution=(64, 64))  # the pipelines' default scheduler configs
    fast = apply_schedule(copy.deepcopy(masked), export_schedule(masked, keys))
    fast.dydit_fast.token_log = []
    expected, got = sample_two_steps(family, masked), sample_two_steps(family, fast)
    assert_latents_close(got, expected, 1e-5)  # fp32, reordered sums only
    assert len(fast.dydit_fast.token_log) == 2  # one forward per step, CFG halves in one batch
