"""`dydit-bench infer` runs the three paths on the same inputs and reports the table's fields; its
released-width presets come from the replica records (not run here: minutes each)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from dydit_scale.bench import infer
from dydit_scale.bench.infer_models import PRESETS, at_resolution
from dydit_scale.models.registry import get_replica


def test_bench_infer_json_reports_static_masked_and_fast(capsys):
    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    assert infer.run(parser.parse_args(["--preset", "tiny", "--steps", "2", "--repeats", "1", "--json",
                                        "--threads", "1"])) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["path"]: row for row in result["rows"]}
    assert list(rows) == ["static", "masked", "fast"]
    assert rows["static"]["flops_ratio"] == 1.0 and rows["fast"]["flops_ratio"] < 1.0
    assert rows["fast"]["flops_ratio"] == rows["masked"]["flops_ratio"]
    for row in rows.values():
        assert row["efficiency"] == row["speedup"] * row["flops_ratio"] and row["s_per_step"] > 0
    assert result["max_abs_diff_fast_vs_masked"] < 1e-5


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("preset, replica", [("flux-dev", "flux-dev"), ("pixart-alpha", "pixart-alpha-1024"),
                                             ("latte-1", "latte-1")])
def test_released_presets_are_one_block_per_stack_of_the_replica_with_token_routers(preset, replica):
    family, record = get_replica(replica)
    found = PRESETS[preset]
    assert found.family == family.name and found.config == record.transformer_config(1)
    assert found.dynamic.get("tokens") is True and 0 < found.token_keep <= 1
    assert found.tokens in found.help and found.defaults["batch"] == 1


def test_released_presets_default_to_batch_1_and_few_steps_unless_flags_say_otherwise():
    args = infer.resolve(_parse("--preset", "flux-dev", "--device", "cpu", "--dtype", "bf16", "--attention", "sdpa"))
    assert (args.batch, args.steps, args.repeats) == (1, 2, 3)
    assert (args.device, args.dtype, args.attention) == ("cpu", "bf16", "sdpa")
    assert infer.resolve(_parse("--preset", "flux-dev", "--steps", "5")).steps == 5


@pytest.mark.parametrize(("preset", "resolution", "latent_hw", "tokens"), [
    ("flux-dev", 1024, (128, 128), "1024²: 4096 image + 512 text tokens"),
    ("pixart-alpha", 512, (64, 64), "512²: 1024 image + 120 text tokens"),
    ("latte-1", 512, (64, 64), "512² × 16 frames: 16 × 1024 image + 120 text tokens"),
])
def test_released_presets_take_a_resolution_and_their_tokens_follow(preset, resolution, latent_hw, tokens):
    sized = at_resolution(preset, resolution)
    assert (sized.latent_hw, sized.resolution, sized.tokens) == (latent_hw, (resolution, resolution), tokens)
    assert at_resolution(preset, None) is PRESETS[preset]


@pytest.mark.parametrize(("argv", "message"), [
    (("--preset", "dit-b", "--resolution", "512"), "^--resolution: only for the released-width presets"),
    (("--preset", "flux-dev", "--resolution", "1000"), "^--resolution: expected a positive multiple of 16"),
])
def test_a_resolution_the_preset_cannot_take_is_a_one_line_error(argv, message):
    with pytest.raises(SystemExit, match=message):
        infer.check_args(_parse("--device", "cpu", *argv))


def test_flux_dev_runs_at_a_chosen_resolution(capsys):
    assert infer.run(_parse("--preset", "flux-dev", "--resolution", "64", "--steps", "1", "--repeats", "1",
                            "--device", "cpu", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["resolution"] == [64, 64] and result["tokens"] == "64²: 16 image + 512 text tokens"
    assert result["max_abs_diff_fast_vs_masked"] < 1e-3


def test_xformers_without_cuda_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="^--attention: xformers needs CUDA"):
        infer.check_args(_parse("--attention", "xformers", "--device", "cpu"))
    with pytest.raises(SystemExit, match="^--device: cuda"):
        infer.check_args(_parse("--device", "cuda"))


def test_bench_infer_records_device_dtype_and_attention_and_runs_bf16(capsys):
    assert infer.run(_parse("--preset", "tiny-flux", "--steps", "1", "--repeats", "1", "--threads", "1",
                            "--device", "cpu", "--dtype", "bf16", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["device"], result["dtype"], result["attention"]) == ("cpu", "bf16", "sdpa")
    assert result["tokens"] == PRESETS["tiny-flux"].tokens
    assert result["goal_checks"]["fast_efficiency"]["goal"] == ">= 0.9"


def test_dit_xl_is_the_whole_released_dit_xl_2_at_batch_2_for_classifier_free_guidance():
    family, record = get_replica("dit-xl-2-256")
    preset = PRESETS["dit-xl"]
    assert preset.family == family.name == "dit" and preset.config == record.transformer_config()
    assert preset.config["num_layers"] == 28 and preset.text_tokens == 0
    args = infer.resolve(_parse("--preset", "dit-xl"))
    assert (args.batch, args.steps) == (2, 2)


@pytest.mark.slow
def test_dit_xl_fast_path_matches_masked_at_a_small_resolution(capsys):
    """All 28 blocks at full width on 8² latents (16 tokens): the whole model runs all three paths."""
    assert infer.run(_parse("--preset", "dit-xl", "--resolution", "64", "--steps", "1", "--repeats", "1",
                            "--device", "cpu", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == "64²: 16 image tokens"
    rows = {row["path"]: row for row in result["rows"]}
    assert 0.2 < rows["fast"]["flops_ratio"] < 0.8 and result["max_abs_diff_fast_vs_masked"] < 1e-4


def test_cache_times_static_and_fast_again_under_a_fixed_reuse_plan(capsys):
    pytest.importorskip("cache_dit")
    assert infer.run(_parse("--preset", "tiny", "--steps", "4", "--repeats", "1", "--threads", "1", "--device", "cpu",
                            "--cache", "--cache-fn", "1", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["path"]: row for row in result["rows"]}
    assert list(rows) == ["static", "masked", "fast", "static+cache", "fast+cache"]
    assert rows["fast+cache"]["flops_ratio"] is None and rows["fast+cache"]["speedup"] > 0
    cache = result["cache"]
    assert cache["computed_steps"] == [1, 0, 1, 0] and (cache["fn"], cache["bn"]) == (1, 0)
    assert cache["reused_steps"] == {"static+cache": [1, 3], "fast+cache": [1, 3]}
    assert set(result["goal_checks"]) == {"fast_efficiency", "cache_combined"}


@pytest.mark.parametrize(("argv", "message"), [
    (("--preset", "latte-1"), "^--cache: latte: cache-dit cannot cache this family"),
    (("--preset", "flux-dev"), r"^--cache: fn 8 \+ bn 0 blocks always run, but transformer_blocks has 1: .*"
                               r"\(--layers raises the depth\)$"),
    (("--preset", "flux-dev", "--layers", "12", "--cache-bn", "4"),
     "^--cache: fn 8 [+] bn 4 blocks always run, but transformer_blocks has 12"),
    (("--preset", "dit-b", "--layers", "8"), "^--layers: only for the released-width presets"),
])
def test_a_cache_the_preset_cannot_run_is_a_one_line_error(argv, message):
    with pytest.raises(SystemExit, match=message):
        infer.check_args(_parse("--device", "cpu", "--cache", *argv))
