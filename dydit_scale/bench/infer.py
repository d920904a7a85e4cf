"""`dydit-bench infer`: seconds per sampling step of the stock, masked-dynamic and fast-dynamic transformer.

All three run the same weights on the same inputs (a CFG-sized batch at the time keys of a real
diffusers scheduler). The dynamic model's timestep routers get random weights and zero bias, so the
schedule keeps about half of the heads and MLP groups with scattered, t-dependent masks (λ ≈ 0.5).
The paths alternate at every step in rotating order, after an untimed warm-up pass. Reported per
path: s/step (best round, which damps a shared machine's noise; the median round too), the analytic
FLOPs ratio of `flops_ratio`, speed-up over the stock model, and efficiency = speed-up ÷ (1 / FLOPs
ratio): 1.0 means the FLOPs saved turn fully into time saved. The goal is a fast-path efficiency ≥ 0.90.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

from dydit_scale.bench.goals import Goal, goal_checks
from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.flops import flops_ratio
from dydit_scale.dynamic.routers import TimestepRouter, TokenRouter
from dydit_scale.infer.export import export_schedule
from dydit_scale.infer.fast import apply_schedule
from dydit_scale.infer.keys import sampler_time_keys
from dydit_scale.models.convert import make_dynamic
from dydit_scale.models.registry import get_family

__all__ = ["PRESETS", "add_arguments", "run"]

_DIT_B = dict(num_attention_heads=12, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=4,
              cross_attention_dim=768, sample_size=32, patch_size=2, caption_channels=64,
              use_additional_conditions=False, norm_type="ada_norm_single")
#: name -> (family, transformer config, dynamic config, text tokens, help)
PRESETS: dict[str, tuple[str, dict, dict, int, str]] = {
    "tiny": ("pixart", get_family("pixart").tiny_config, dict(cross_attention=True, tokens=False), 5,
             "tiny PixArt (C = 32, 4 heads, 16 tokens): overheads dominate"),
    "tiny-flux": ("flux", get_family("flux").tiny_config, dict(tokens=False), 5,
                  "tiny FLUX (C = 64, 4 heads, 16 + 5 tokens)"),
    "dit-b": ("pixart", _DIT_B, dict(cross_attention=True, tokens=False), 16,
              "DiT-B width (C = 768, 12 heads, 256 tokens, 4 blocks), TDW only"),
    "dit-b-sdt": ("pixart", _DIT_B, dict(cross_attention=True, tokens=True), 16,
                  "dit-b with token routers dropping part of the tokens (SDT gather/scatter)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="dit-b",
                        help="; ".join(f"{k}: {v[4]}" for k, v in PRESETS.items()))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps (time keys) per timed pass")
    parser.add_argument("--batch", type=int, default=2, help="batch size (2 = one prompt with CFG)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed passes per path")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init model and inputs")


def _models(preset: str, seed: int) -> tuple[nn.Module, nn.Module]:
    """The stock transformer and its dynamic version with ~half the units on (see module doc)."""
    family, config, dynamic, _, _ = PRESETS[preset]
    torch.manual_seed(seed)
    stock = get_family(family).transformer_class(**config).eval()
    model = make_dynamic(copy.deepcopy(stock), DynamicConfig(**dynamic)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TimestepRouter):
                module.proj.weight.copy_(torch.randn(module.proj.weight.shape, generator=g))
                module.proj.bias.zero_()
            elif isinstance(module, TokenRouter):
                module.fc2.weight.copy_(torch.randn(module.fc2.weight.shape, generator=g) * 0.5)
                module.fc2.bias.fill_(0.5)
    return stock, model


def _inputs(preset: str, config: Any, keys: torch.Tensor, batch: int, seed: int) -> list[dict[str, Any]]:
    """One keyword-input dict per step: fixed latents and text, the step's key for every sample."""
    family, _, _, text_tokens, _ = PRESETS[preset]
    common = get_family(family).example_inputs(config, batch=batch, text_tokens=text_tokens,
                                               generator=torch.Generator().manual_seed(seed))
    return [dict(common, timestep=key.reshape(1).expand(batch), return_dict=False) for key in keys]


@torch.no_grad()
def _warm_up(model: nn.Module, steps: list[dict[str, Any]], ratios: list[float] | None) -> torch.Tensor:
    """One untimed pass (fills the fast path's sliced-weight cache); returns the last output."""
    for inputs in steps:
        out = model(**inputs)[0]
        if ratios is not None:
            ratios.append(float(flops_ratio(model).mean()))
    return out


@torch.no_grad()
def _timed_rounds(paths: dict[str, nn.Module], steps: list[dict[str, Any]], repeats: int,
                  clock: str) -> dict[str, list[float]]:
    """Seconds per step of each path in each round. Paths alternate at every step, in rotating order,
    so that load from other processes falls on all of them alike."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    names = list(paths)
    totals = {name: [0.0] * repeats for name in names}
    for round_index in range(repeats):
        for step_index, inputs in enumerate(steps):
            shift = (round_index + step_index) % len(names)
            for name in names[shift:] + names[:shift]:
                start = now()
                paths[name](**inputs)
                totals[name][round_index] += (now() - start) / len(steps)
    return totals


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build the three paths, warm them up, then time `repeats` interleaved rounds."""
    torch.set_num_threads(args.threads)
    family = PRESETS[args.preset][0]
    stock, dynamic = _models(args.preset, args.seed)
    keys = sampler_time_keys(family, steps=args.steps, resolution=(1024, 1024)).values
    fast = apply_schedule(copy.deepcopy(dynamic), export_schedule(dynamic, keys))
    steps = _inputs(args.preset, stock.config, keys, args.batch, args.seed)
    paths = {"static": stock, "masked": dynamic, "fast": fast}
    ratios: dict[str, list[float]] = {"masked": [], "fast": []}
    outputs = {name: _warm_up(model, steps, ratios.get(name)) for name, model in paths.items()}
    times = _timed_rounds(paths, steps, args.repeats, args.clock)
    static = min(times["static"])
    rows = []
    for name in paths:
        ratio = statistics.fmean(ratios[name]) if name in ratios else 1.0
        best = min(times[name])
        speedup = static / best
        rows.append(dict(path=name, s_per_step=best, s_per_step_median=statistics.median(times[name]),
                         flops_ratio=ratio, speedup=speedup, efficiency=speedup * ratio,
                         efficiency_median=statistics.median(times["static"]) / statistics.median(times[name]) * ratio))
    return dict(rows=rows, preset=args.preset, family=family, steps=args.steps, batch=args.batch,
                repeats=args.repeats, threads=args.threads, clock=args.clock, device="cpu",
                max_abs_diff_fast_vs_masked=float((outputs["fast"] - outputs["masked"]).abs().max()),
                goal_checks=goal_checks({"fast_efficiency": efficiency_goal(rows)}))


def efficiency_goal(rows: list[dict[str, Any]]) -> Goal:
    """The fast path turns at least 90 % of the FLOPs it saves into time saved."""
    return Goal(next(row["efficiency"] for row in rows if row["path"] == "fast"), ">=", 0.90, "0.90")


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"preset {result['preset']} ({PRESETS[result['preset']][4]}); batch {result['batch']}, "
          f"{result['steps']} steps, best of {result['repeats']} rounds, {result['threads']} threads, {result['clock']} clock")
    print(f"{'path':<8}{'s/step':>10}{'median':>10}{'FLOPs ratio':>13}{'speed-up':>10}{'efficiency':>12}{'(median)':>10}")
    for row in result["rows"]:
        print(f"{row['path']:<8}{row['s_per_step']:>10.4f}{row['s_per_step_median']:>10.4f}"
              f"{row['flops_ratio']:>13.3f}{row['speedup']:>10.2f}{row['efficiency']:>12.2f}"
              f"{row['efficiency_median']:>10.2f}")
    print(f"max |fast - masked| = {result['max_abs_diff_fast_vs_masked']:.2e}")
    goal = efficiency_goal(result["rows"])
    print(f"fast-path efficiency {goal.value:.2f}: {goal.mark()}")
    return 0
