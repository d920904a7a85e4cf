"""The DeepSpeed config is a pure function of the recipe; derived keys cannot be set twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from dydit_scale.config import RecipeError, load_recipe
from dydit_scale.train.ds_config import DERIVED_KEYS, build_ds_config

TINY = Path(__file__).resolve().parents[3] / "recipes" / "tiny_cpu.yaml"


def test_batch_sizes_clipping_precision_and_stage_come_from_the_recipe():
    recipe = load_recipe(TINY, ["data.batch_size=3", "train.grad_accum=2", "optim.max_grad_norm=0.5",
                                "model.dtype=bf16", "train.zero_stage=3", "train.offload_params=true"])
    config = build_ds_config(recipe, world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 3 * 2 * 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert config["optimizer"]["params"]["lr"] == recipe.optim.lr


def test_extra_deepspeed_keys_are_merged():
    recipe = load_recipe(TINY, ["train.deepspeed={zero_optimization: {reduce_bucket_size: 1000}, comms_logger: {enabled: false}}"])
    config = build_ds_config(recipe, world_size=1)
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert config["comms_logger"] == {"enabled": False}


@pytest.mark.parametrize("raw, field", [
    ("{train_micro_batch_size_per_gpu: 8}", "data.batch_size"),
    ("{gradient_clipping: 2.0}", "optim.max_grad_norm"),
    ("{bf16: {enabled: true}}", "model.dtype"),
    ("{zero_optimization: {stage: 3}}", "train.zero_stage"),
    ("{optimizer: {type: Adam}}", "optim.lr"),
])
def test_setting_a_derived_key_names_the_recipe_field_to_use(raw, field):
    recipe = load_recipe(TINY, [f"train.deepspeed={raw}"])
    with pytest.raises(RecipeError) as err:
        build_ds_config(recipe, world_size=1)
    assert len(err.value.lines) == 1 and field in err.value.lines[0]


def test_function_is_pure():
    recipe = load_recipe(TINY)
    assert build_ds_config(recipe, 2) == build_ds_config(recipe, 2)
    assert set(DERIVED_KEYS) >= {"train_batch_size", "gradient_clipping", "zero_optimization.stage"}
