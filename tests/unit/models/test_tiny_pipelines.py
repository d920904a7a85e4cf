"""The tiny pipeline folders load offline with the stock diffusers pipelines and sample 2 steps."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from dydit_scale.models.registry import get_family
from dydit_scale.models.sit import SiTPipeline

PIPELINES = {"flux": diffusers.FluxPipeline, "pixart": diffusers.PixArtAlphaPipeline, "latte": diffusers.LattePipeline,
             "dit": diffusers.DiTPipeline, "sit": SiTPipeline}
CALLS = {
    "flux": dict(height=32, width=32, max_sequence_length=32),
    "pixart": dict(height=16, width=16, max_sequence_length=32, use_resolution_binning=False),
    "latte": dict(height=16, width=16, video_length=4),
    "dit": dict(guidance_scale=4.0),
    "sit": dict(guidance_scale=4.0),
}


@pytest.mark.parametrize("family", ["flux", "pixart", "latte", "dit", "sit"])
def test_tiny_pipeline_loads_offline_and_samples_two_steps(tiny_model_dir, family):
    folder = Path(tiny_model_dir(family))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family].__name__
    pipe = PIPELINES[family].from_pretrained(folder, local_files_only=True)
    prompt = [207] if family in ("dit", "sit") else "a red circle at the centre"  # DiT takes class labels
    out = pipe(prompt, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), **CALLS[family])
    pixels = out.frames if family == "latte" else out.images
    assert np.isfinite(pixels).all() and pixels.shape[-1] == 3


@pytest.mark.parametrize("family", ["flux", "pixart", "latte", "dit", "sit"])
def test_tiny_transformers_have_room_for_dynamic_width(family):
    config = get_family(family).tiny_config
    assert config["num_attention_heads"] >= 2 and config["num_layers"] >= 2
    if family == "flux":
        assert config["num_single_layers"] >= 2
