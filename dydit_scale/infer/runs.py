"""Rebuild a run's fine-tuned dynamic transformer from a checkpoint folder (architecture §2.9).

The model is rebuilt from `<run>/recipe.yaml` exactly as training built it (load → make dynamic, which
permutes deterministically → adapters), then the step's weights are loaded:
* LoRA runs (`lora.kind` lora | td_lora): the base weights of `model.path`, `routers.safetensors`, and
  `td_lora.safetensors` or `pytorch_lora_weights.safetensors`;
* full fine-tuning: a state dict consolidated from the DeepSpeed ZeRO files by the caller's
  `consolidate(step_folder)` (the CLI passes DeepSpeed's own `zero_to_fp32`; this layer never
  imports DeepSpeed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from dydit_scale.config import Recipe, load_recipe
from dydit_scale.infer.sliced import effective_linear
from dydit_scale.io import load_tensors
from dydit_scale.lora import load_lora_diffusers, load_td_lora
from dydit_scale.lora.td_lora import TDLoRALinear
from dydit_scale.models.build import build_dynamic_transformer

__all__ = ["LoadedRun", "load_run", "resolve_checkpoint", "save_transformer"]

MARKER = "dydit_state.json"
ROUTERS_FILE = "routers.safetensors"
TD_LORA_FILE = "td_lora.safetensors"
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


def load_run(path: str | Path, *, consolidate: Consolidate | None = None) -> LoadedRun:
    """The run's dynamic transformer with the step's weights, fp32, eval mode, no gradients."""
    step_folder = resolve_checkpoint(path)
    recipe_path = step_folder.parent.parent / "recipe.yaml"
    if not recipe_path.is_file():
        raise ValueError(f"{step_folder}: no recipe.yaml in its run folder {recipe_path.parent}")
    recipe = load_recipe(recipe_path)
    model = build_dynamic_transformer(recipe.model, recipe.dynamic, recipe.lora)
    if recipe.lora.kind == "none":
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
    step = int(json.loads((step_folder / MARKER).read_text())["step"])
    return LoadedRun(model.requires_grad_(False).eval(), recipe, step_folder, step)


def _load_exact(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k in dict(model.named_parameters())]
    if missing or result.unexpected_keys:
        raise ValueError(f"{where}: consolidated weights do not fit the recipe's model "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")


def _load_routers(model: nn.Module, path: Path) -> None:
    tensors = load_tensors(path)
    own = {n for n, _ in model.named_parameters() if "router" in n}
    if own != set(tensors):
        raise ValueError(f"{path}: router tensors do not match the recipe's model (missing "
                         f"{sorted(own - set(tensors))[:3]}, unexpected {sorted(set(tensors) - own)[:3]})")
    model.load_state_dict(tensors, strict=False)


def save_transformer(model: nn.Module, folder: str | Path) -> Path:
    """Write the fine-tuned transformer as a diffusers folder of the stock class (config.json +
    diffusion_pytorch_model.safetensors), loadable with `<Class>.from_pretrained`.

    Weights stay in the permuted order (function-preserving at full width, §2.6); plain LoRA is
    merged in; routers and TD-LoRA tensors (which depend on t and cannot be merged once) are left
    out — they live in the checkpoint's adapter files.
    """
    if any(isinstance(m, TDLoRALinear) for m in model.modules()):
        raise ValueError("--save-transformer: a TD-LoRA run cannot be merged into one static transformer "
                         "(its update depends on t); use the checkpoint with dydit-sample")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if "router" not in k and "lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight, _ = effective_linear(module)
            state.pop(f"{name}.base_layer.weight")
            state[f"{name}.weight"] = weight
            if f"{name}.base_layer.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    stock = next(cls for cls in type(model).__mro__ if cls.__module__.startswith("diffusers."))
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config.update({"_class_name": stock.__name__, "_diffusers_version": diffusers.__version__})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return folder
