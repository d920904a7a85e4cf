"""The time keys a diffusers pipeline passes to the transformer, for a sampler, step count and
resolution (method spec §7.2), computed with the real diffusers scheduler classes.

* FLUX (`FluxPipeline`): FlowMatchEuler σ's from `np.linspace(1, 1/N, N)`, shifted by μ(image
  tokens) when the scheduler uses dynamic shifting; the transformer receives `t.to(dtype) / 1000`.
* PixArt-α (`PixArtAlphaPipeline`: DPMSolverMultistep or DDIM) and Latte (`LattePipeline`: DDIM):
  the scheduler's integer `timesteps`, passed unchanged.
The scheduler config comes from the pipeline folder (`scheduler/scheduler_config.json`) when it has
one; the config used is recorded with the keys so sampling can rebuild the same scheduler.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dydit_scale.dynamic.schedule import TimeKeys, TokenShape

__all__ = ["SAMPLERS", "build_scheduler", "sampler_time_keys", "sampling_token_shape"]

#: family -> sampler name -> diffusers scheduler class (first = the pipeline's default)
SAMPLERS: dict[str, dict[str, str]] = {
    "flux": {"flow_euler": "FlowMatchEulerDiscreteScheduler"},
    "pixart": {"dpm_solver": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"},
    "latte": {"ddim": "DDIMScheduler"},
}
_DEFINITIONS = {
    "flux": ("flux_sigma", "σ ∈ (0, 1] as FluxPipeline passes it (timestep / 1000); the transformer embeds 1000·σ"),
    "ddpm": ("ddpm_index", "the scheduler's integer timestep in [0, num_train_timesteps)"),
}


def _folder_config(pipeline: Path | None, name: str) -> dict[str, Any] | None:
    path = None if pipeline is None else pipeline / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def build_scheduler(sampler: dict[str, Any]):
    """The diffusers scheduler a time-key record was made with (class + config)."""
    import diffusers

    return getattr(diffusers, sampler["class"]).from_config(sampler["config"])


def _flux_keys(scheduler, steps: int, resolution: tuple[int, int], vae: dict | None,
               dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mirrors diffusers 0.42.1 `FluxPipeline.__call__` steps 4-5 and its denoising loop."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 8
    height, width = (2 * (int(side) // (vae_scale * 2)) for side in resolution)
    image_seq_len = (height // 2) * (width // 2)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if hasattr(scheduler.config, "use_flow_sigmas") and scheduler.config.use_flow_sigmas:
        sigmas = None
    config = scheduler.config
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    return timesteps.to(dtype) / 1000, {"mu": mu, "image_tokens": image_seq_len}


def sampler_time_keys(family: str, *, steps: int, resolution: tuple[int, int], sampler: str | None = None,
                      pipeline: str | Path | None = None, dtype: torch.dtype = torch.float32) -> TimeKeys:
    """Keys the family's pipeline passes for `steps` steps at `resolution` (height, width) in `dtype`."""
    import diffusers

    choices = SAMPLERS[family]
    name = sampler or next(iter(choices))
    if name not in choices:
        raise ValueError(f"--sampler: {family} supports {', '.join(choices)}, got {name!r}")
    if steps < 1:
        raise ValueError(f"--steps: expected an integer >= 1, got {steps}")
    folder = None if pipeline is None else Path(pipeline)
    config = _folder_config(folder, "scheduler")
    cls = getattr(diffusers, choices[name])
    scheduler = cls.from_config(config) if config else cls()
    extra: dict[str, Any] = {}
    if family == "flux":
        values, extra = _flux_keys(scheduler, steps, resolution, _folder_config(folder, "vae"), dtype)
        definition = _DEFINITIONS["flux"]
    else:
        scheduler.set_timesteps(steps, device="cpu")
        values, definition = scheduler.timesteps.clone(), _DEFINITIONS["ddpm"]
    record = {"name": name, "class": cls.__name__, "steps": steps, "resolution": list(resolution),
              "dtype": str(dtype).removeprefix("torch."), "scheduler_config_from": "pipeline" if config else "default",
              "config": json.loads(json.dumps(dict(scheduler.config), default=str)), **extra}
    return TimeKeys(values=values, definition=f"{definition[0]}: {definition[1]}", direction="large = noise",
                    sampler=record)


def sampling_token_shape(family: str, transformer_config: Any, *, resolution: tuple[int, int], text_tokens: int,
                         frames: int = 1, pipeline: str | Path | None = None) -> TokenShape:
    """Image / text tokens (and frames) the transformer sees when sampling at `resolution`."""
    vae = _folder_config(None if pipeline is None else Path(pipeline), "vae")
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 8
    if family == "flux":
        height, width = (2 * (int(side) // (vae_scale * 2)) for side in resolution)
        return TokenShape(image_tokens=(height // 2) * (width // 2), text_tokens=text_tokens)
    patch = transformer_config.patch_size
    height, width = (int(side) // vae_scale // patch for side in resolution)
    return TokenShape(image_tokens=height * width, text_tokens=text_tokens, frames=frames if family == "latte" else 1)
