"""`dydit-bench infer`: seconds per sampling step of the stock, masked-dynamic and fast-dynamic transformer.

All three run the same weights (shared, not copied, so that released widths fit in memory) on the same
inputs, at the time keys of the family's real diffusers scheduler; `infer_models` builds them and sets
the routers' schedule near a FLOPs ratio of 0.5. The paths alternate at every step in rotating order,
after an untimed warm-up pass. Reported per path: s/step (the best of each step's rounds, which damps
a shared machine's noise; the median too), the analytic FLOPs ratio of `flops_ratio`, speed-up over
the stock model, and efficiency = speed-up ÷ (1 / FLOPs ratio): 1.0 means the FLOPs saved turn fully
into time saved. The goal is a fast-path efficiency ≥ 0.90.

`--run RUN --schedule DIR` times a trained run instead of a preset (e.g. a released DyDiT converted with
`dydit-convert official-dydit`, its schedule written by `dydit-export RUN --steps N DIR`): static is the
stock diffusers class over the run's weights, masked the run's dynamic model, fast `apply_schedule` of
it; the time keys and token shape are the schedule's (`infer_run`). The FLOPs ratios are measured as
above, so a run with token routers shows their savings on the random inputs too; the schedule's own
(width-only) ratio is reported beside them.

`--cache` adds the static and fast paths again under cache-dit's step cache, on a fixed plan of reused
steps (`infer_cache`), and checks that the two speed-ups multiply.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dydit_scale.bench.goals import Goal, goal_checks
from dydit_scale.bench.infer_cache import CACHED, cached_paths, combined_goal, computed_plan, refresh
from dydit_scale.bench.infer_models import PRESETS, at_depth, at_resolution, build_paths
from dydit_scale.bench.infer_run import build_run_paths
from dydit_scale.config import StepCacheConfig
from dydit_scale.console import quiet_third_party
from dydit_scale.dynamic.flops import flops_ratio
from dydit_scale.infer.keys import sampler_time_keys
from dydit_scale.infer.step_cache import block_counts, cache_problem, cached_steps
from dydit_scale.models.build import attention_problem

__all__ = ["PRESETS", "add_arguments", "run"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_PRESET = "dit-b"
#: --run: alternating timed passes per path unless --repeats says otherwise
RUN_REPEATS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS,
                        help=f"default {DEFAULT_PRESET}; "
                             + "; ".join(f"{name}: {preset.help}" for name, preset in PRESETS.items()))
    parser.add_argument("--run", help="time a trained run instead of a preset: a run folder (its newest complete "
                                      "checkpoint) or a step folder, e.g. from `dydit-convert official-dydit`; "
                                      "needs --schedule")
    parser.add_argument("--schedule", metavar="DIR", help="with --run: a folder written by `dydit-export RUN`; its time keys and "
                                           "token shape are the ones timed")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--steps", type=int, help="sampler steps (time keys) per timed pass; default per preset; "
                                                  "--run: all of the schedule's, or this many of them evenly spread")
    parser.add_argument("--batch", type=int, help="batch size (2 = one prompt with CFG); default per preset; "
                                                  "--run: 2 for dit, else 1")
    parser.add_argument("--repeats", type=int, help=f"alternating timed passes per path; default per preset; "
                                                    f"--run: {RUN_REPEATS}")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time (CPU runs only)")
    parser.add_argument("--resolution", type=int,
                        help="pixels per side for the released-width presets (default: flux-dev 512, "
                             "pixart-alpha 1024, latte-1 256); the image tokens follow")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init model and inputs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the three paths run (CUDA timing is synchronised)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights and activations")
    parser.add_argument("--attention", choices=["sdpa", "xformers"], default="sdpa",
                        help="attention kernel of all three paths; xformers needs CUDA and the xformers package")
    parser.add_argument("--layers", type=int, help="blocks per stack of a released-width preset (default: 1, "
                                                   "dit-xl all 28); --cache needs more than --cache-fn + --cache-bn")
    cache = parser.add_argument_group("step cache (cache-dit, the `cache` extra; speed only)")
    cache.add_argument("--cache", action="store_true",
                       help="also time the static and fast paths under DBCache, computing every other step and "
                            "reusing the rest (random weights: a threshold would decide nothing real)")
    cache.add_argument("--cache-fn", type=int, default=8, help="first blocks a reused step still computes")
    cache.add_argument("--cache-bn", type=int, default=0, help="last blocks a reused step still computes")


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for the flags this machine cannot run."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: cuda asked for, but torch sees no CUDA device")
    problem = attention_problem(args.attention)
    if problem is not None:
        raise SystemExit(f"--attention: {problem.removeprefix('model.attention: ')}")
    if args.clock == "cpu" and args.device == "cuda":
        raise SystemExit("--clock: cpu time does not measure CUDA kernels; use wall with --device cuda")
    for flag in ("steps", "batch", "repeats", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag}: expected an integer >= 1, got {getattr(args, flag)}")
    if args.run or args.schedule:
        if not (args.run and args.schedule):
            raise SystemExit("--run and --schedule go together: the run's model and the schedule dydit-export "
                             "wrote for it")
        for flag in ("preset", "resolution", "layers"):
            if getattr(args, flag) is not None:
                raise SystemExit(f"--run: times the run's own model at the schedule's token shape; drop --{flag}")
        return
    try:
        preset = at_depth(at_resolution(args.preset or DEFAULT_PRESET, args.resolution), args.layers)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    problem = cache_problem(preset.family, block_counts(preset.family, preset.config), _cache(args))
    if problem is not None:
        raise SystemExit(f"--cache: {problem}" + (" (--layers raises the depth)" if preset.replica else ""))


def _cache(args: argparse.Namespace) -> StepCacheConfig:
    """The step cache of --cache (mode none without it)."""
    if not args.cache:
        return StepCacheConfig()
    return StepCacheConfig(mode="dbcache", fn=args.cache_fn, bn=args.cache_bn, warmup=0)


@torch.no_grad()
def _warm_up(model: nn.Module, steps: list[dict[str, Any]], ratios: list[float] | None) -> torch.Tensor:
    """One untimed pass (fills the fast path's sliced-weight cache); returns the last output."""
    for inputs in steps:
        out = model(**inputs)[0]
        if ratios is not None:
            ratios.append(float(flops_ratio(model).mean()))
    return out


@torch.no_grad()
def _timed_rounds(paths: dict[str, nn.Module], steps: list[dict[str, Any]], repeats: int, clock: str,
                  device: torch.device) -> dict[str, list[list[float]]]:
    """Seconds of each path at each step (inner lists) in each round. Paths alternate at every step, in
    rotating order, so that load from other processes falls on all of them alike; CUDA work is waited for.
    A round is one generation for the cached paths."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(paths)
    seconds: dict[str, list[list[float]]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names:
            seconds[name].append([])
        refresh(paths, len(steps))
        for step_index, inputs in enumerate(steps):
            shift = (round_index + step_index) % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                start = now()
                paths[name](**inputs)
                sync()
                seconds[name][-1].append(now() - start)
    return seconds


def _per_step(rounds: list[list[float]], pick: Callable[[list[float]], float]) -> float:
    """Mean over the steps of `pick` (min, median) over the rounds: the best of each step's rounds damps
    bursts of load from other processes better than the best whole round."""
    return statistics.fmean(pick(list(step)) for step in zip(*rounds))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """The flags with the preset's defaults filled in for the unset steps, batch and repeats (--run: the
    repeats; steps and batch follow the schedule and the family)."""
    if args.run:
        return argparse.Namespace(**vars(args) | {"repeats": args.repeats or RUN_REPEATS})
    name = args.preset or DEFAULT_PRESET
    unset = {key: value for key, value in PRESETS[name].defaults.items() if getattr(args, key) is None}
    return argparse.Namespace(**vars(args) | unset | {"preset": name})


def _setup(args: argparse.Namespace, device: torch.device,
           dtype: torch.dtype) -> tuple[dict[str, nn.Module], list[dict[str, Any]], dict[str, Any]]:
    """(paths, inputs of each step, what the report says about them) of the preset or of --run."""
    if args.run:
        try:
            bench = build_run_paths(args.run, args.schedule, steps=args.steps, batch=args.batch, seed=args.seed,
                                    device=device, dtype=dtype, attention=args.attention)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(str(err)) from None
        return bench.paths, bench.steps, dict(run=args.run, schedule=args.schedule) | bench.facts
    preset = at_depth(at_resolution(args.preset, args.resolution), args.layers)
    keys = sampler_time_keys(preset.family, steps=args.steps, resolution=preset.resolution, dtype=dtype).values
    paths, steps = build_paths(preset, keys, args.batch, args.seed, device, dtype, args.attention)
    return paths, steps, dict(preset=args.preset, family=preset.family, tokens=preset.tokens,
                              resolution=list(preset.resolution), steps=args.steps, batch=args.batch,
                              layers=block_counts(preset.family, preset.config))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build the three paths, warm them up, then time `repeats` interleaved rounds."""
    check_args(args)
    args = resolve(args)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    paths, steps, facts = _setup(args, device, dtype)
    if args.cache:
        try:
            paths |= cached_paths(paths, facts["family"], _cache(args), len(steps))
        except ValueError as err:
            raise SystemExit(f"--cache: {err}") from None
        facts["cache"] = _cache(args).model_dump() | {"computed_steps": computed_plan(len(steps))}
    ratios: dict[str, list[float]] = {"masked": [], "fast": []}
    refresh(paths, len(steps))
    outputs = {name: _warm_up(model, steps, ratios.get(name)) for name, model in paths.items()}
    times = _timed_rounds(paths, steps, args.repeats, args.clock, device)
    if args.cache:  # what the last round reused, as the plan says
        facts["cache"]["reused_steps"] = {name: cached_steps(paths[name]) for name in CACHED}
    best = {name: _per_step(rounds, min) for name, rounds in times.items()}
    median = {name: _per_step(rounds, statistics.median) for name, rounds in times.items()}
    rows = []
    for name in paths:
        # a cached path's work depends on the plan, not on one FLOPs ratio: no efficiency for it
        ratio = None if name in CACHED else statistics.fmean(ratios[name]) if name in ratios else 1.0
        speedup = best["static"] / best[name]
        rows.append(dict(path=name, s_per_step=best[name], s_per_step_median=median[name], flops_ratio=ratio,
                         speedup=speedup, efficiency=None if ratio is None else speedup * ratio,
                         efficiency_median=None if ratio is None else median["static"] / median[name] * ratio))
    diff = (outputs["fast"].float() - outputs["masked"].float()).abs().max()
    goals = {"fast_efficiency": efficiency_goal(rows)}
    if args.cache:
        goals["cache_combined"] = combined_goal(best)
    return dict(rows=rows, **facts, repeats=args.repeats, threads=args.threads, clock=args.clock, device=args.device,
                dtype=args.dtype, attention=args.attention, max_abs_diff_fast_vs_masked=float(diff),
                goal_checks=goal_checks(goals))


def efficiency_goal(rows: list[dict[str, Any]]) -> Goal:
    """The fast path turns at least 90 % of the FLOPs it saves into time saved."""
    return Goal(next(row["efficiency"] for row in rows if row["path"] == "fast"), ">=", 0.90, "0.90")


def run(args: argparse.Namespace) -> int:
    quiet_third_party(verbose=False)
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if "run" in result:
        print(f"run {result['run']} ({result['family']}, {result['checkpoint']})")
        print(f"schedule {result['schedule']}: {result['steps']} of its {result['schedule_steps']} steps, "
              f"FLOPs ratio {result['schedule_flops_ratio']:.3f} (width only)")
    else:
        print(f"preset {result['preset']} ({PRESETS[result['preset']].help})")
    print(f"tokens: {result['tokens']}")
    print(f"batch {result['batch']}, {result['steps']} steps, best of {result['repeats']} rounds per step, "
          f"{result['device']} {result['dtype']} {result['attention']}, {result['threads']} threads, "
          f"{result['clock']} clock")
    if "cache" in result:
        cache = result["cache"]
        print(f"step cache {cache['mode']} on static+cache and fast+cache: steps computed {cache['computed_steps']} "
              f"(1) or reused (0), a reused step computing the first {cache['fn']} and last {cache['bn']} blocks")
    print(f"{'path':<13}{'s/step':>10}{'median':>10}{'FLOPs ratio':>13}{'speed-up':>10}{'efficiency':>12}"
          f"{'(median)':>10}")
    for row in result["rows"]:
        print(f"{row['path']:<13}{row['s_per_step']:>10.4f}{row['s_per_step_median']:>10.4f}"
              f"{_cell(row['flops_ratio'], '.3f'):>13}{row['speedup']:>10.2f}{_cell(row['efficiency'], '.2f'):>12}"
              f"{_cell(row['efficiency_median'], '.2f'):>10}")
    print(f"max |fast - masked| = {result['max_abs_diff_fast_vs_masked']:.2e}")
    goal = efficiency_goal(result["rows"])
    print(f"fast-path efficiency {goal.value:.2f}: {goal.mark()}")
    if "cache" in result:
        goal = combined_goal({row["path"]: row["s_per_step"] for row in result["rows"]})
        print(f"cache and fast path together: {goal.value:.2f} of the product of their speed-ups: {goal.mark()}")
    return 0


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
