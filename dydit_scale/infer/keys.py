"""The time keys a diffusers pipeline passes to the transformer, for a sampler, step count and
resolution, computed with the real diffusers scheduler classes.

Each family knows how its pipeline turns the scheduler's timesteps into the transformer's
`timestep` argument (`Family.time_keys`): FLUX passes σ = t / 1000 shifted by the image-token count,
PixArt-α and Latte pass the scheduler's integer timesteps unchanged. The scheduler config comes from
the pipeline folder (`scheduler/scheduler_config.json`) when it has one; the config used is recorded
with the keys so sampling can rebuild the same scheduler.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dydit_scale.dynamic.schedule import TimeKeys, TokenShape
from dydit_scale.models.registry import get_family

__all__ = ["build_scheduler", "sampler_time_keys", "sampling_token_shape"]


def _folder_config(pipeline: Path | None, name: str) -> dict[str, Any] | None:
    path = None if pipeline is None else pipeline / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def build_scheduler(sampler: dict[str, Any]):
    """The diffusers scheduler a time-key record was made with (class + config)."""
    import diffusers

    return getattr(diffusers, sampler["class"]).from_config(sampler["config"])


def sampler_time_keys(family: str, *, steps: int, resolution: tuple[int, int], sampler: str | None = None,
                      pipeline: str | Path | None = None, dtype: torch.dtype = torch.float32) -> TimeKeys:
    """Keys the family's pipeline passes for `steps` steps at `resolution` (height, width) in `dtype`."""
    import diffusers

    record = get_family(family)
    choices = record.samplers
    name = sampler or next(iter(choices))
    if name not in choices:
        raise ValueError(f"--sampler: {family} supports {', '.join(choices)}, got {name!r}")
    if steps < 1:
        raise ValueError(f"--steps: expected an integer >= 1, got {steps}")
    folder = None if pipeline is None else Path(pipeline)
    config = _folder_config(folder, "scheduler")
    cls = getattr(diffusers, choices[name])
    scheduler = cls.from_config(config) if config else cls()
    values, extra = record.time_keys(scheduler, steps=steps, resolution=resolution,
                                     vae_config=_folder_config(folder, "vae"), dtype=dtype)
    made_by = {"name": name, "class": cls.__name__, "steps": steps, "resolution": list(resolution),
               "dtype": str(dtype).removeprefix("torch."), "scheduler_config_from": "pipeline" if config else "default",
               "config": json.loads(json.dumps(dict(scheduler.config), default=str)), **extra}
    return TimeKeys(values=values, definition=record.time_key_definition, direction="large = noise",
                    sampler=made_by)


def sampling_token_shape(family: str, transformer_config: Any, *, resolution: tuple[int, int], text_tokens: int,
                         frames: int = 1, pipeline: str | Path | None = None) -> TokenShape:
    """Image / text tokens (and frames) the transformer sees when sampling at `resolution`."""
    vae = _folder_config(None if pipeline is None else Path(pipeline), "vae")
    return get_family(family).token_shape(transformer_config, resolution=resolution, vae_config=vae,
                                          text_tokens=text_tokens, frames=frames)
