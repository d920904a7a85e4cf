"""`dydit-bench train` times static and dynamic steps side by side and measures TD-LoRA's memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from dydit_scale.bench import train

CPU = torch.device("cpu")
RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def test_flux_dev_preset_is_the_released_width_at_512_without_building_it():
    preset = train.PRESETS["flux-dev"]
    config = preset.config
    assert preset.family == "flux" and preset.dtype == torch.bfloat16 and preset.batch == 1
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (24, 128)
    assert (config["num_layers"], config["num_single_layers"]) == (1, 1)
    assert config["joint_attention_dim"] == 4096 and config["guidance_embeds"]
    h, w = preset.latent_hw
    assert (h, w) == (64, 64) and (h // 2) * (w // 2) == 1024  # 512² through the 8× VAE, 2×2 packing
    assert preset.text_tokens == 512


def test_flux_td_lora_is_the_recipes():
    lora = yaml.safe_load((RECIPES / "flux_tdlora_zero2.yaml").read_text())["lora"]
    for name in ("tiny-flux", "flux-dev"):
        ours = train.PRESETS[name].lora
        assert (ours.targets, ours.rank, ours.alpha, ours.groups) == (
            lora["targets"], lora["rank"], lora["alpha"], lora["groups"])


@pytest.mark.parametrize(("name", "flow"), [("tiny", False), ("tiny-flux", True)])
def test_timesteps_are_drawn_as_each_family_trains(name, flow):
    preset = train.PRESETS[name]
    config = train._stock(preset).config
    t = train._inputs(preset, config, 4, CPU)["timestep"]
    assert t.shape == (4,)
    if flow:
        assert t.is_floating_point() and 0 <= t.min() and t.max() < 1
    else:
        assert t.dtype == torch.long and 0 <= t.min() and t.max() < 1000


@pytest.mark.parametrize("name", ["tiny", "tiny-flux"])
def test_timed_models_share_weights_and_compute_the_same_function(name):
    preset = train.PRESETS[name]
    models = train._timed_models(preset, CPU)
    static, dynamic = models["static"], models["dynamic_masked"]
    assert {id(p) for p in static.parameters()} <= {id(p) for p in dynamic.parameters()}
    inputs = train._inputs(preset, static.config, 2, CPU)
    with torch.no_grad():
        torch.testing.assert_close(dynamic.eval()(**inputs).sample, static.eval()(**inputs).sample,
                                   rtol=1e-4, atol=1e-5)
    seconds = train._step_seconds(preset, 1, CPU)
    assert set(seconds) == {"static", "dynamic_masked"} and min(seconds.values()) > 0


@pytest.mark.parametrize("name", ["tiny", "tiny-flux"])
def test_td_lora_trains_adapters_and_routers_only(name):
    """In-process (the bench runs it in a subprocess); FLUX's targets all match its module names."""
    preset = train.PRESETS[name]
    td = train._peak_memory_child(preset, "td_lora", CPU)
    full = train._peak_memory_child(preset, "full", CPU)
    assert full["trainable"] == full["total"] and 0 < td["trainable"] < 0.5 * td["total"]
    assert td["peak_bytes"] >= 0 and full["peak_bytes"] > 0


@pytest.mark.slow
def test_bench_train_json_reports_step_time_memory_and_trainable_share(capsys):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    assert train.run(parser.parse_args(["--preset", "tiny", "--steps", "2", "--json"])) == 0
    result = json.loads(capsys.readouterr().out)
    seconds = result["step_s"]
    assert set(seconds) == {"static", "dynamic_masked"} and min(seconds.values()) > 0
    assert result["step_time_ratio"] == seconds["dynamic_masked"] / seconds["static"]
    assert result["peak_memory_ratio"] > 0
    share = result["trainable_share"]
    assert share["full"] == 1.0 and 0 < share["td_lora"] < 0.5  # TD-LoRA freezes the base weights
    assert result["setup"]["family"] == "pixart" and "goal_checks" in result
