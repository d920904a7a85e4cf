"""Rebuild a run's fine-tuned dynamic transformer from a checkpoint folder.

The model is rebuilt from `<run>/recipe.yaml` exactly as training built it (load → make dynamic, which
permutes deterministically → adapters), then the step's weights are loaded:
* LoRA runs (`lora.kind` lora | td_lora): the base weights of `model.path`, `routers.safetensors`, and
  `td_lora.safetensors` or `pytorch_lora_weights.safetensors`;
* full fine-tuning: a state dict consolidated from the DeepSpeed ZeRO files by the caller's
  `consolidate(step_folder)` (the CLI passes DeepSpeed's own `zero_to_fp32`; this layer never
  imports DeepSpeed);
* a routers-only step (its marker says `"weights": "routers"`, as `dydit-convert official-dydit`
  writes for released DyDiT checkpoints): `model.path` unchanged plus `routers.safetensors`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft.tuners.lora import LoraLayer
from torch import nn

from dydit_scale.config import Recipe, load_recipe
from dydit_scale.dynamic.importance import reorder_state_dict
from dydit_scale.dynamic.routers import router_parameters
from dydit_scale.infer.sliced import effective_linear
from dydit_scale.io import load_tensors
from dydit_scale.lora import load_lora_diffusers, load_td_lora
from dydit_scale.lora.td_lora import TDLoRALinear
from dydit_scale.models.build import build_dynamic_transformer

__all__ = ["ROUTERS_ONLY", "TD_LORA_NOT_MERGEABLE", "WEIGHTS_FIELD", "LoadedRun", "load_run", "resolve_checkpoint",
           "run_recipe", "save_transformer", "stock_class"]

MARKER = "dydit_state.json"
ROUTERS_FILE = "routers.safetensors"
TD_LORA_FILE = "td_lora.safetensors"
#: marker field saying which weights a step folder holds; absent = what `lora.kind` implies
WEIGHTS_FIELD = "weights"
#: ...only the routers: every other weight is `model.path`'s, unchanged
ROUTERS_ONLY = "routers"
Consolidate = Callable[[Path], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LoadedRun:
    """A rebuilt model with where it came from."""

    model: nn.Module
    recipe: Recipe
    step_folder: Path
    step: int


def _complete(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.endswith(".partial") and (folder / MARKER).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete step folder, or a run folder's newest complete one."""
    path = Path(path)
    if _complete(path):
        return path
    steps = sorted(p for p in (path / "checkpoints").glob("step-*") if _complete(p)) if path.is_dir() else []
    if not steps:
        raise ValueError(f"{path}: expected a run folder with complete checkpoints/step-NNNNNNN folders "
                         f"or a step folder holding {MARKER}")
    return steps[-1]


def run_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """The recipe a run was trained with, and the step folder `path` resolves to."""
    step_folder = resolve_checkpoint(path)
    recipe_path = step_folder.parent.parent / "recipe.yaml"
    if not recipe_path.is_file():
        raise ValueError(f"{step_folder}: no recipe.yaml in its run folder {recipe_path.parent}")
    return load_recipe(recipe_path), step_folder


def load_run(path: str | Path, *, consolidate: Consolidate | None = None) -> LoadedRun:
    """The run's dynamic transformer with the step's weights, fp32, eval mode, no gradients."""
    recipe, step_folder = run_recipe(path)
    marker = json.loads((step_folder / MARKER).read_text())
    routers_only = marker.get(WEIGHTS_FIELD) == ROUTERS_ONLY
    if routers_only and recipe.lora.kind != "none":
        raise ValueError(f"{step_folder / MARKER}: a routers-only step needs lora.kind none in its recipe, "
                         f"got {recipe.lora.kind!r}")
    model = build_dynamic_transformer(recipe.model, recipe.dynamic, recipe.lora)
    if routers_only:
        _load_routers(model, step_folder / ROUTERS_FILE)
    elif recipe.lora.kind == "none":
        if consolidate is None:
            raise ValueError(f"{step_folder}: a full fine-tuning checkpoint needs its ZeRO files consolidated "
                             "(pass consolidate=, as dydit-export does)")
        _load_exact(model, consolidate(step_folder), step_folder)
    else:
        _load_routers(model, step_folder / ROUTERS_FILE)
        if recipe.lora.kind == "td_lora":
            load_td_lora(model, step_folder / TD_LORA_FILE)
        else:
            load_lora_diffusers(model, step_folder)
    step = int(marker["step"])
    return LoadedRun(model.requires_grad_(False).eval(), recipe, step_folder, step)


def _load_exact(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k in dict(model.named_parameters())]
    if missing or result.unexpected_keys:
        raise ValueError(f"{where}: consolidated weights do not fit the recipe's model "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")


def _load_routers(model: nn.Module, path: Path) -> None:
    tensors = load_tensors(path)
    own = set(router_parameters(model))
    if own != set(tensors):
        raise ValueError(f"{path}: router tensors do not match the recipe's model (missing "
                         f"{sorted(own - set(tensors))[:3]}, unexpected {sorted(set(tensors) - own)[:3]})")
    model.load_state_dict(tensors, strict=False)


#: one line for users who ask to merge a TD-LoRA run into a static transformer
TD_LORA_NOT_MERGEABLE = ("a TD-LoRA update depends on the timestep and cannot be merged into one static transformer; "
                         "sample it with dydit-sample (fast path) or load it in Python with dydit_scale.load_run(RUN)")


def stock_class(model: nn.Module) -> type:
    """The diffusers class a dynamic (or fast) transformer was made from."""
    return next(cls for cls in type(model).__mro__ if cls.__module__.startswith("diffusers."))


def save_transformer(model: nn.Module, folder: str | Path, *, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | int = "10GB") -> Path:
    """Write the fine-tuned transformer with the stock class's own `save_pretrained` (sharded
    safetensors + index, `dtype`), so `<Class>.from_pretrained` and every tool reading diffusers folders
    load it.

    Plain LoRA is merged in; heads and MLP channels go back to the base model's order (the full-width
    function is unchanged, and a diff against the base model stays meaningful); routers are left out.
    """
    if any(isinstance(m, TDLoRALinear) for m in model.modules()):
        raise ValueError(f"--save-transformer: {TD_LORA_NOT_MERGEABLE}")
    state = model.state_dict()
    for name in router_parameters(model):
        del state[name]
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            # keep the wrapped Linear only: its adapter tensors (lora_A/B, …) are merged into it below
            base = f"{name}.base_layer."
            for key in [k for k in state if k.startswith(f"{name}.") and not k.startswith(base)]:
                del state[key]
            weight, _ = effective_linear(module)
            state.pop(f"{name}.base_layer.weight")
            state[f"{name}.weight"] = weight
            if f"{name}.base_layer.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    state = reorder_state_dict(state, getattr(model, "dydit_spans", []), to_base=True)
    with init_empty_weights():  # parameters only: buffers the config computes stay real
        stock = stock_class(model).from_config(model.config)
    stock.load_state_dict({k: v.detach().to("cpu", dtype) for k, v in state.items()}, strict=True, assign=True)
    stock.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    return Path(folder)
