"""Dynamic models and comparisons for the GPU parity tests.

The models come from the `dydit-bench infer` builders (random routers with scattered, t-dependent
masks; token routers calibrated to keep a share of the tokens), so the tests check what the bench
times: tiny widths for every family, and one block per stack of each released pipeline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dydit_scale import apply_schedule, export_schedule
from dydit_scale.bench.infer_models import PRESETS, Preset, build_paths, to_device
from dydit_scale.infer.keys import sampler_time_keys
from dydit_scale.models.registry import get_family

FAMILIES = ["flux", "pixart", "latte"]
RELEASED = ["flux-dev", "pixart-alpha", "latte-1"]
"""`dydit-bench infer` presets at released widths."""


def tiny_preset(family: str, *, tokens: bool) -> Preset:
    """The family's tiny transformer; PixArt and Latte with dynamic cross-attention too."""
    dynamic = dict(tokens=tokens) | ({} if family == "flux" else dict(cross_attention=True))
    return Preset(family, get_family(family).tiny_config, dynamic, 5, "tiny", f"tiny {family}", resolution=(64, 64))


@dataclass
class Case:
    """A masked dynamic model on the test device, the time keys of its schedule and one input per key."""

    masked: nn.Module
    keys: torch.Tensor
    inputs: list[dict[str, Any]]


def build_case(preset: Preset | str, device: torch.device, dtype: torch.dtype, *, steps: int = 2) -> Case:
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    keys = sampler_time_keys(preset.family, steps=steps, resolution=preset.resolution, dtype=dtype).values
    paths, inputs = build_paths(preset, keys, 1, 0, device, dtype, "sdpa")
    return Case(paths["masked"], keys, inputs)


def fast_copy(case: Case, attention: str, *, fp32: bool = False) -> nn.Module:
    """The fast path of `case.masked` with `attention`, sharing its weights; with `fp32`, an fp32 copy
    that executes the same schedule (the same head and MLP decisions): the reference for bf16 error."""
    schedule = export_schedule(case.masked, case.keys)
    if fp32:
        model = copy.deepcopy(case.masked).float()
    else:
        shared = {id(tensor): tensor for tensor in [*case.masked.parameters(), *case.masked.buffers()]}
        model = copy.deepcopy(case.masked, shared)
    return apply_schedule(model, schedule, attention=attention, verify=False)


@torch.no_grad()
def outputs(model: nn.Module, inputs: list[dict[str, Any]], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The model's outputs at every key, stacked, in fp32; inputs cast to `dtype` when given."""
    device = next(model.parameters()).device
    cast = (lambda step: step) if dtype is None else (lambda step: to_device(step, device, dtype))
    return torch.stack([model(**cast(step))[0].float() for step in inputs])


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def close_share(got: torch.Tensor, expected: torch.Tensor, tol: float) -> float:
    """Share of elements with |got - expected| <= tol * (1 + |expected|)."""
    return float(((got - expected).abs() <= tol * (1 + expected.abs())).float().mean())
