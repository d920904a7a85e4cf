"""The three paths of `dydit-bench infer --run RUN --schedule DIR`: a trained run under its exported schedule.

* static: the run's stock diffusers class, built on the meta device and pointed at the run's tensors
  (nothing copied): the stock forward, with no router or mask work (peft LoRA wrappers: their base
  weights, the cost of a merged model);
* masked: the run's dynamic model as `load_run` rebuilds it, routers live;
* fast: `apply_schedule` of a copy sharing those tensors, checked against the schedule (model class,
  routers, base-weight and checkpoint hashes), so a schedule of another run is a one-line error.

The time keys are the schedule's own (`--steps N`: N of them, evenly spread over the sampler's run);
the inputs are the family's `example_inputs` at the schedule's token shape, so the analytic FLOPs
ratios are the ones `dydit-export` reported. Full fine-tuning runs are consolidated from their ZeRO
files with DeepSpeed (`train.consolidate`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dydit_scale.bench.infer_models import cast, model_inputs, share_stock_weights, to_device
from dydit_scale.dynamic.schedule import RouterSchedule, TokenShape
from dydit_scale.infer.fast import apply_schedule, weight_sharing_memo
from dydit_scale.infer.runs import load_run, stock_class
from dydit_scale.models.build import set_attention_backend
from dydit_scale.models.registry import get_family
from dydit_scale.train.consolidate import zero_state_dict

__all__ = ["RunBench", "build_run_paths", "latent_grid", "pick_steps", "token_words"]


@dataclass(frozen=True)
class RunBench:
    """The three paths of a run, the inputs of each timed step, and what the report says about them."""

    paths: dict[str, nn.Module]
    steps: list[dict[str, Any]]
    facts: dict[str, Any]
    """family, tokens, resolution, steps, batch, schedule_flops_ratio (of the timed keys), checkpoint."""


def pick_steps(schedule: RouterSchedule, steps: int | None) -> torch.Tensor:
    """Indices of the schedule steps to time: all of them, or `steps` evenly spread (first and last kept)."""
    total = schedule.steps
    if steps is None or steps == total:
        return torch.arange(total)
    if steps > total:
        raise ValueError(f"--steps: the schedule holds {total} steps, cannot time {steps}")
    return torch.linspace(0, total - 1, steps).round().long()


def latent_grid(family: str, config: Any, shape: TokenShape, resolution: list[int] | None) -> tuple[int, int]:
    """The (unpacked) latent height and width whose image tokens are `shape`'s: tokens per side × the
    patch size (FLUX packs 2×2 latent cells into a token), in the aspect of the sampler's resolution."""
    per_token = config.patch_size * (2 if family == "flux" else 1)
    height, width = resolution or (1, 1)
    rows = max(1, round(math.sqrt(shape.image_tokens * height / width)))
    cols = shape.image_tokens // rows
    if rows * cols != shape.image_tokens:
        raise ValueError(f"--schedule: {shape.image_tokens} image tokens do not form a grid in the aspect of "
                         f"{height}x{width}")
    return rows * per_token, cols * per_token


def token_words(shape: TokenShape, resolution: list[int] | None) -> str:
    """The token shape in words, as the presets write it."""
    image = f"{shape.frames} × {shape.image_tokens} image" if shape.frames > 1 else f"{shape.image_tokens} image"
    text = f" + {shape.text_tokens} text" if shape.text_tokens else ""
    size = "" if not resolution else (f"{resolution[0]}²: " if resolution[0] == resolution[1]
                                      else f"{resolution[0]}x{resolution[1]}: ")
    return f"{size}{image}{text} tokens"


def _stock(dynamic: nn.Module, family: str) -> nn.Module:
    """The stock diffusers transformer over the dynamic model's tensors, with its loaded-config settings."""
    with torch.device("meta"):
        stock = stock_class(dynamic).from_config(dynamic.config).eval()
    share_stock_weights(stock, dynamic)
    return get_family(family).configure_loaded(stock).requires_grad_(False)


def build_run_paths(run_path: str | Path, schedule_path: str | Path, *, steps: int | None, batch: int | None,
                    seed: int, device: torch.device, dtype: torch.dtype, attention: str) -> RunBench:
    """Load the run and its schedule and build the three paths over one copy of the weights. ValueError /
    FileNotFoundError: one line naming the flag."""
    try:
        schedule = RouterSchedule.load(schedule_path)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        raise ValueError(f"--schedule: {err}") from None
    picked = pick_steps(schedule, steps)
    try:
        run = load_run(run_path, consolidate=zero_state_dict)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--run: {err}") from None
    family, dynamic = run.recipe.model.family, run.model
    try:  # fp32 on the CPU, as loaded: the hashes the schedule records are of these tensors
        fast = apply_schedule(copy.deepcopy(dynamic, weight_sharing_memo(dynamic)), schedule, attention=attention)
    except ValueError as err:
        raise ValueError(f"--schedule: {schedule_path}: {str(err).removeprefix('apply_schedule: ')}") from None
    dynamic = cast(dynamic, device, dtype)  # moves the shared parameters in place: fast follows
    fast = cast(fast, device, dtype)
    stock = _stock(dynamic, family)
    if attention != "sdpa":  # the stock processors and the masked blocks run SDPA already
        for model in (stock, dynamic):
            set_attention_backend(model, attention)
    shape, resolution = schedule.token_shape, schedule.time_keys.sampler.get("resolution")
    batch = batch or (2 if family == "dit" else 1)  # dit: one image under classifier-free guidance
    common = model_inputs(family, stock.config, batch=batch, text_tokens=shape.text_tokens,
                          latent_hw=latent_grid(family, stock.config, shape, resolution), seed=seed)
    common = to_device(common, device, dtype)
    keys = schedule.time_keys.values[picked]
    inputs = [dict(common, timestep=key.reshape(1).expand(batch).to(device), return_dict=False) for key in keys]
    facts = dict(family=family, tokens=token_words(shape, resolution), resolution=resolution,
                 steps=len(inputs), batch=batch, checkpoint=str(run.step_folder),
                 schedule_steps=schedule.steps, schedule_flops_ratio=float(schedule.flops_ratio[picked].mean()))
    return RunBench({"static": stock, "masked": dynamic, "fast": fast}, inputs, facts)
