"""Small, portable adapter files written beside every checkpoint (routers + LoRA / TD-LoRA).

Under ZeRO-3 every parameter is a partition; the adapter tensors are gathered on all ranks first and
written by rank 0, so the files hold the real weights (the failure of huggingface/peft#2500 and
huggingface/diffusers#9393 elsewhere).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from dydit_scale import dist
from dydit_scale.config import Recipe
from dydit_scale.dynamic.routers import router_parameters
from dydit_scale.io import save_tensors
from dydit_scale.lora import save_lora_diffusers, save_td_lora

ROUTERS_FILE = "routers.safetensors"
TD_LORA_FILE = "td_lora.safetensors"


def _gathered(params: list[nn.Parameter]):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save_adapters(model: nn.Module, recipe: Recipe, folder: Path) -> None:
    """Write `routers.safetensors` and the LoRA file of `lora.kind` into `folder` (call on all ranks)."""
    routers = router_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen = {id(p) for p in trainable}
    with _gathered(trainable + [p for p in routers.values() if id(p) not in seen]):
        if not dist.is_main():
            return
        save_tensors(folder / ROUTERS_FILE, routers,
                     metadata={"format": "dydit_scale.routers", "family": recipe.model.family})
        if recipe.lora.kind == "td_lora":
            save_td_lora(model, folder / TD_LORA_FILE)
        elif recipe.lora.kind == "lora":
            save_lora_diffusers(model, folder)
