"""`export_schedule`: freeze a dynamic model's TDW routers at a sampler's time keys.

The masks are what the routers decide in eval mode (σ(z) > 0.5, unit 0 forced on) for the pure
timestep embedding e_t of each key, computed exactly as the dynamic model's forward computes it
(`model.timestep_embedding`). The layer table, hashes and permutations come from the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dydit_scale.dynamic.routers import TimestepRouter, router_parameters
from dydit_scale.dynamic.schedule import (
    LayerEntry,
    RouterSchedule,
    TimeKeys,
    TokenShape,
    schedule_flops_ratio,
    tensors_hash,
)
from dydit_scale.infer.keys import sampler_time_keys, sampling_token_shape
from dydit_scale.infer.plots import schedule_heatmap
from dydit_scale.infer.runs import TD_LORA_NOT_MERGEABLE, Consolidate, load_run, run_recipe, stock_class
from dydit_scale.infer.runs import save_transformer as write_transformer
from dydit_scale.models.dynamic_block import DynamicBlock
from dydit_scale.models.dynamic_model import DynamicTransformerMixin
from dydit_scale.models.family import Family
from dydit_scale.models.registry import family_of

__all__ = [
    "default_token_shape",
    "export_run",
    "export_schedule",
    "layer_table",
    "model_hashes",
    "ratio_warning",
    "timestep_routers",
]

_ADAPTER_PARTS = ("lora_", "td_gate")  # peft LoRA and TD-LoRA tensors; routers are found by type


def timestep_routers(model: nn.Module) -> dict[str, TimestepRouter]:
    """Every TDW router by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TimestepRouter)}


def layer_table(model: nn.Module) -> list[LayerEntry]:
    """One `LayerEntry` per dynamic block, in module order: each block describes itself."""
    return [block.layer_entry(name) for name, block in model.named_modules() if isinstance(block, DynamicBlock)]


def model_hashes(model: nn.Module) -> tuple[str, str]:
    """(base-weights hash, checkpoint hash): the transformer's own tensors in permuted order (peft's
    `.base_layer` names folded back), and the routers + LoRA / TD-LoRA tensors."""
    base, adapters, routers = {}, {}, router_parameters(model).keys()
    for name, tensor in model.state_dict().items():
        if name in routers or any(part in name for part in _ADAPTER_PARTS):
            adapters[name] = tensor
        else:
            base[name.replace(".base_layer.", ".")] = tensor
    return tensors_hash(base), tensors_hash(adapters)


def default_token_shape(model: nn.Module) -> TokenShape:
    """The family's usual sampling shape (FLUX: 1024², 4096 + 512 tokens; PixArt / Latte: their
    config's sample size with 120 T5 tokens, Latte with its `video_length` frames)."""
    return _family(model).default_token_shape(model.config)


def _family(model: nn.Module) -> Family:
    family = family_of(model)
    if family is None:
        raise TypeError(f"export_schedule: {type(model).__name__} is not a transformer of a registered family")
    return family


@torch.no_grad()
def router_masks(model: nn.Module, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval-mode decision of every timestep router for each key, bool [T, U] (1[z > 0], as the routers decide in eval mode)."""
    device = next(model.parameters()).device
    e_t = model.timestep_embedding(values.to(device), values.shape[0])
    masks = {}
    for name, router in timestep_routers(model).items():
        training = router.training
        router.eval()
        try:
            router.prepare_step(e_t)
        finally:
            router.train(training)
        masks[name] = (router.decision > 0.5).cpu()
    return masks


def export_schedule(model: nn.Module, time_keys: TimeKeys | torch.Tensor | list[float], *,
                    token_shape: TokenShape | None = None, source: dict[str, Any] | None = None) -> RouterSchedule:
    """Freeze `model`'s TDW routers at `time_keys` (the exact `timestep` values the pipeline passes).

    `token_shape` sets the shape of the per-step FLOPs ratios (default: `default_token_shape`);
    `source` (e.g. the checkpoint folder) is recorded in the header.
    """
    if not isinstance(model, DynamicTransformerMixin):
        raise TypeError(f"export_schedule: expected a dynamic transformer (make_dynamic), got {type(model).__name__}")
    keys = time_keys if isinstance(time_keys, TimeKeys) else TimeKeys(torch.as_tensor(time_keys))
    if keys.values.dim() != 1 or keys.values.numel() == 0:
        raise ValueError(f"export_schedule: time keys must be a non-empty 1-D tensor, got shape {list(keys.values.shape)}")
    masks = router_masks(model, keys.values)
    layers = layer_table(model)
    shape = token_shape or default_token_shape(model)
    base_hash, checkpoint_hash = model_hashes(model)
    config = model.dydit_config
    stock = stock_class(model)
    return RouterSchedule(
        time_keys=keys, masks=masks, layers=layers, token_shape=shape,
        flops_ratio=schedule_flops_ratio(layers, masks, shape),
        permutations={k: v.cpu() for k, v in model.dydit_permutations.items()},
        family=_family(model).name,
        model_class=stock.__name__, base_model_hash=base_hash, checkpoint_hash=checkpoint_hash,
        target_flops_ratio=config.target_flops_ratio, tau=config.tau, source=dict(source or {}),
    )


def export_run(path: str | Path, out: str | Path, *, steps: int, resolution: tuple[int, int] | None = None,
               sampler: str | None = None, dtype: torch.dtype = torch.float32, save_transformer: bool = False,
               max_shard_size: str | int = "10GB", consolidate: Consolidate | None = None) -> RouterSchedule:
    """`dydit-export`: a checkpoint (or a run's newest) → `out/schedule.{safetensors,json}` + `schedule.png`
    (+ `out/transformer/`, a stock diffusers folder in `dtype`, on request), for the time keys of `sampler` /
    `steps` / `resolution`."""
    if save_transformer and run_recipe(path)[0].lora.kind == "td_lora":
        raise ValueError(f"--save-transformer: {TD_LORA_NOT_MERGEABLE}")
    run = load_run(path, consolidate=consolidate)
    recipe, family = run.recipe, run.recipe.model.family
    resolution = resolution or (recipe.data.resolution, recipe.data.resolution)
    pipeline = recipe.model.path  # a transformer-only folder has no scheduler or VAE config: defaults then
    keys = sampler_time_keys(family, steps=steps, resolution=resolution, sampler=sampler, pipeline=pipeline,
                             dtype=dtype)
    shape = sampling_token_shape(family, run.model.config, resolution=resolution,
                                 text_tokens=recipe.data.max_text_tokens, frames=recipe.data.num_frames,
                                 pipeline=pipeline)
    source = {"run": recipe.run.name, "checkpoint": run.step_folder.name, "step": run.step,
              "model_path": recipe.model.path, "lora": recipe.lora.kind, "token_routers": recipe.dynamic.tokens}
    schedule = export_schedule(run.model, keys, token_shape=shape, source=source)
    schedule.save(out)
    schedule_heatmap(schedule, Path(out) / "schedule.png")
    if save_transformer:
        write_transformer(run.model, Path(out) / "transformer", dtype=dtype, max_shard_size=max_shard_size)
    return schedule


def ratio_warning(schedule: RouterSchedule, tolerance: float = 0.03) -> str | None:
    """A line when the schedule's mean FLOPs ratio misses the λ it was trained for by more than
    `tolerance`: training keeps a unit with probability σ(z), the frozen schedule keeps it iff z > 0,
    so routers whose logits still sit near 0 move the ratio when frozen."""
    ratio, target = float(schedule.flops_ratio.mean()), schedule.target_flops_ratio
    if target is None or abs(ratio - target) <= tolerance:
        return None
    line = (f"the exported mean FLOPs ratio {ratio:.3f} misses the trained λ {target:.2f} by {ratio - target:+.3f} "
            f"(more than {tolerance}); routers whose logits sit near 0 flip when frozen: train longer "
            "(see keep/<router> in TensorBoard)")
    if schedule.source.get("token_routers"):
        line += ("; this ratio counts dynamic width only, the live token routers skip more MLP work at sampling "
                 "time (dydit-sample's compute_map.png)")
    return line
