"""The DeepSpeed config, derived from the recipe by one pure function.

The recipe is the single source of truth for batch sizes, accumulation, clipping, precision, ZeRO
stage, offload, optimizer and schedule (accelerate's `fill_match` idea, as a hard rule): the raw
`train.deepspeed` block may add other keys, but setting a derived one is an error naming the recipe
field to use instead.
"""

from __future__ import annotations

from typing import Any

from dydit_scale.config import Recipe, RecipeError

#: DeepSpeed key (dotted) -> recipe field(s) that own it.
DERIVED_KEYS: dict[str, str] = {
    "train_batch_size": "data.batch_size and train.grad_accum",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.max_grad_norm",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "amp": "model.dtype",
    "optimizer": "optim.lr, optim.betas and optim.weight_decay",
    "scheduler": "optim.warmup_steps and optim.schedule",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer": "train.offload_optimizer",
    "zero_optimization.offload_param": "train.offload_params",
}


def derived_key_conflicts(extra: dict[str, Any]) -> list[str]:
    """One line per `train.deepspeed` key that the recipe derives itself."""
    found = []
    for key, field in DERIVED_KEYS.items():
        head, _, tail = key.partition(".")
        if head in extra and (not tail or (isinstance(extra[head], dict) and tail in extra[head])):
            found.append(f"train.deepspeed.{key}: derived from the recipe; set {field} instead")
    return found


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def build_ds_config(recipe: Recipe, world_size: int, *, torch_adam: bool = True) -> dict[str, Any]:
    """DeepSpeed config for `recipe` at `world_size` ranks.

    `torch_adam=True` keeps DeepSpeed from JIT-compiling its fused/CPU Adam (minutes on CPU).
    No `scheduler` key: the LR schedule (`engine.build_lr_scheduler`, diffusers' `get_scheduler`) goes
    to `deepspeed.initialize` as an object, since it scales each group's own base LR (router LR scale).
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected an integer >= 1, got {world_size}")
    conflicts = derived_key_conflicts(recipe.train.deepspeed)
    if conflicts:
        raise RecipeError(conflicts)
    train, optim = recipe.train, recipe.optim
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": recipe.data.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": recipe.data.batch_size * train.grad_accum * world_size,
        "gradient_clipping": optim.max_grad_norm,
        "bf16": {"enabled": recipe.model.dtype == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": list(optim.betas), "weight_decay": optim.weight_decay,
                       "torch_adam": torch_adam},
        },
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if recipe.checkpoint.universal:  # resume from ds_to_universal's output: any world size
        config["checkpoint"] = {"load_universal": True}
    return _merge(config, recipe.train.deepspeed)
