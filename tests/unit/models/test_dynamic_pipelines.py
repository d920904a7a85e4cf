"""The stock diffusers pipelines run a fresh dynamic transformer unchanged and sample what the stock one does."""

from __future__ import annotations

import pytest
from dynamic_cases import stock_and_dynamic
from pipeline_cases import assert_latents_close, sample_two_steps


@pytest.mark.parametrize("family", ["flux", "pixart", "latte"])
def test_pipeline_with_dynamic_transformer_matches_stock_for_two_steps(family):
    stock, dynamic = stock_and_dynamic(family)
    expected = sample_two_steps(family, stock, flux_size=32)
    got = sample_two_steps(family, dynamic, flux_size=32)
    assert_latents_close(got, expected, 1e-4)  # permuted sums: reordered, not the same order
