"""`dydit-sample`: images or videos from a checkpoint through the stock diffusers pipeline running the
fast dynamic transformer, with a sample grid and a per-patch compute map.

The pipeline's scheduler is rebuilt from the schedule's sampler record (class, config, steps,
resolution), so the pipeline passes exactly the schedule's time keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dydit_scale.dynamic.schedule import RouterSchedule
from dydit_scale.infer.fast import apply_schedule
from dydit_scale.infer.keys import build_scheduler, sampler_time_keys, sampling_token_shape
from dydit_scale.infer.plots import compute_map, labelled_grid, save_mp4, save_png
from dydit_scale.infer.runs import Consolidate, load_run
from dydit_scale.infer.step_cache import cached_steps, check_step_cache, enable_step_cache, with_overrides
from dydit_scale.models.loading import load_pipeline
from dydit_scale.models.registry import get_family

__all__ = ["SampleOutputs", "sample_run"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SampleOutputs:
    """Files written by `sample_run`."""

    grid: Path
    compute_map: Path
    videos: tuple[Path, ...] = ()
    #: per sample, the steps the step cache reused (empty lists without a cache)
    cached: tuple[tuple[int, ...], ...] = ()


def sample_run(path: str | Path, schedule_dir: str | Path, out: str | Path, *, prompts: list[str] | None = None,
               seeds: list[int] | None = None, guidance: float | None = None, steps: int | None = None,
               resolution: tuple[int, int] | None = None, low_memory: bool = False,
               consolidate: Consolidate | None = None, cache: dict[str, Any] | None = None) -> SampleOutputs:
    """Sample every prompt × seed with the checkpoint's fast model; write PNG grids (+ mp4s) into `out`.

    Prompts, seeds, guidance and the step cache default to the run recipe's `validation:` section;
    steps and resolution to the schedule's, and other values only where the schedule holds their time keys.
    `cache`: fields of `StepCacheConfig` that replace the recipe's `validation.cache` ones.
    """
    schedule = RouterSchedule.load(schedule_dir)
    if not schedule.time_keys.sampler:
        raise ValueError(f"{schedule_dir}: the schedule has no sampler record; export it with dydit-export")
    run = load_run(path, consolidate=consolidate)
    recipe, family = run.recipe, get_family(run.recipe.model.family)
    cache = with_overrides(recipe.validation.cache, cache or {})
    check_step_cache(run.model, recipe.model.family, cache)
    if steps is not None or resolution is not None:
        schedule = _restricted(schedule, Path(schedule_dir), recipe, run.model.config, steps, resolution)
    sampler = schedule.time_keys.sampler
    model = apply_schedule(run.model, schedule, low_memory=low_memory, attention=recipe.model.attention)
    dtype = _DTYPES[sampler.get("dtype", "float32")]
    pipe = load_pipeline(recipe.model.path, transformer=model if dtype == torch.float32 else model.to(dtype),
                         dtype=dtype)
    pipe.scheduler = build_scheduler(sampler)
    enable_step_cache(pipe, recipe.model.family, cache)
    height, width = sampler["resolution"]
    kwargs = family.pipeline_kwargs(steps=sampler["steps"], height=height, width=width,
                                    guidance=recipe.validation.guidance_scale if guidance is None else guidance,
                                    text_tokens=recipe.data.max_text_tokens, frames=recipe.data.num_frames)
    seeds, prompts = seeds or recipe.validation.seeds, prompts or recipe.validation.prompts
    outputs, first_log, cached = [], None, []
    for seed in seeds:
        for prompt in prompts:
            done = len(outputs)
            pipe.set_progress_bar_config(desc=f"sample {done + 1}/{len(seeds) * len(prompts)} (seed {seed})",
                                         leave=False)
            model.dydit_fast.token_log = []
            result = pipe(**family.prompt_arguments(pipe, prompt), generator=torch.Generator().manual_seed(seed), **kwargs)
            outputs.append(family.first_output(result))
            cached.append(tuple(cached_steps(model)) if cache.mode != "none" else ())
            first_log = first_log if first_log is not None else model.dydit_fast.token_log
    model.dydit_fast.token_log = None
    written = _write(Path(out), family.video, outputs, prompts, seeds, schedule, first_log, cached[0])
    return dataclasses.replace(written, cached=tuple(cached))


def _restricted(schedule: RouterSchedule, where: Path, recipe: Any, config: Any, steps: int | None,
                resolution: tuple[int, int] | None) -> RouterSchedule:
    """The schedule at another step count or resolution, when it holds every key the sampler passes."""
    sampler = schedule.time_keys.sampler
    steps = steps or sampler["steps"]
    resolution = resolution or tuple(sampler["resolution"])
    pipeline = recipe.model.path  # a transformer-only folder has no scheduler or VAE config: defaults then
    keys = sampler_time_keys(recipe.model.family, steps=steps, resolution=resolution, sampler=sampler["name"],
                             pipeline=pipeline, dtype=_DTYPES[sampler.get("dtype", "float32")])
    shape = sampling_token_shape(recipe.model.family, config, resolution=resolution,
                                 text_tokens=recipe.data.max_text_tokens, frames=recipe.data.num_frames,
                                 pipeline=pipeline)
    try:
        return schedule.for_keys(keys, shape)
    except ValueError as err:
        asked = f"{steps} steps at {resolution[0]}x{resolution[1]}"
        made = f"{sampler['steps']} steps at {sampler['resolution'][0]}x{sampler['resolution'][1]}"
        raise ValueError(f"{where}: exported for {made}; {asked}: {err}; export a schedule for them with "
                         f"dydit-export --steps {steps} --resolution {resolution[0]}x{resolution[1]}") from None


def _write(out: Path, video: bool, outputs: list[np.ndarray], prompts: list[str], seeds: list[int],
           schedule: RouterSchedule, token_log: list[torch.Tensor | None], cached: tuple[int, ...]) -> SampleOutputs:
    videos: list[Path] = []
    if video:  # one row of frames per video, in sampling order (seed-major)
        for index, frames in enumerate(outputs):
            videos.append(save_mp4((np.clip(frames, 0, 1) * 255).round().astype(np.uint8), out / f"sample-{index}.mp4"))
        rows = [f"seed {seed}: {prompt}" for seed in seeds for prompt in prompts]
        columns = [f"frame {index}" for index in range(len(outputs[0]))]
        grid = save_png(labelled_grid(np.concatenate(outputs), columns, rows), out / "frames.png")
    else:
        grid = save_png(labelled_grid(np.stack(outputs), list(prompts), [f"seed {seed}" for seed in seeds]),
                        out / "samples.png")
    counts = np.stack([step[-1].numpy() for step in token_log])  # last row: the conditional CFG half
    height, width = schedule.time_keys.sampler["resolution"]
    tokens = schedule.token_shape.image_tokens
    h = max(1, round(math.sqrt(tokens * height / width)))
    cmap = compute_map(counts, (h, tokens // h), blocks=len(schedule.layers),
                       keys=schedule.time_keys.values.double().tolist(), path=out / "compute_map.png", cached=cached)
    return SampleOutputs(grid=grid, compute_map=cmap, videos=tuple(videos))
