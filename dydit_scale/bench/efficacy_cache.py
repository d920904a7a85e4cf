"""`dydit-bench efficacy --cache`: a cache-dit step cache on the static model and on each dynamic arm's
fast path, scored and timed beside the same models uncached.

The cache and DyDiT save different compute (whole blocks of similar steps; width and tokens of every
step), so their speed-ups should multiply. Every arm samples the same prompts from the same noise in
batches of `batch` (a cache decides per generation, on the mean change over its batch, so the batch
is what a user's call would be); timing runs whole generations of one batch, arms in alternation.
Each cached arm reports the share of steps it reused and, for a dynamic arm, how often its decision
matched the static model's at the same step and batch: DBCache reads the first blocks, whose widths
the routers change, so a dynamic model should still reuse the steps the static one reuses.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from torch import nn

from dydit_scale.bench.efficacy_eval import Prompts, Scorer, sample
from dydit_scale.bench.goals import Goal
from dydit_scale.config import StepCacheConfig
from dydit_scale.infer.fast import weight_sharing_memo
from dydit_scale.infer.step_cache import cached_steps, enable_step_cache, refresh_step_cache

__all__ = ["cache_arms", "cache_cause", "cache_goals", "label", "print_cache_table"]


class _CachedSampler:
    """One model under the step cache: samples like `sample`, recording the steps each batch reused."""

    def __init__(self, model: nn.Module, cache: StepCacheConfig, steps: int):
        self.model = enable_step_cache(copy.deepcopy(model, weight_sharing_memo(model)), "pixart", cache)
        self.steps = steps
        self.reused: list[list[int]] = []

    def start(self) -> None:
        refresh_step_cache(self.model, self.steps)

    def end(self) -> None:
        self.reused.append(cached_steps(self.model))


def _decisions(reused: list[list[int]], steps: int) -> torch.Tensor:
    """[batches, steps] booleans: was the step reused."""
    table = torch.zeros(len(reused), steps, dtype=torch.bool)
    for row, indices in enumerate(reused):
        table[row, indices] = True
    return table


@torch.no_grad()
def _seconds_per_image(samplers: dict[str, tuple[nn.Module, _CachedSampler | None]], score: Scorer, batch: int,
                       rounds: int = 5) -> dict[str, float]:
    """Best seconds per image of a whole generation of one batch, arms in alternation."""
    prompts = score.prompts
    first = Prompts(prompts.text[:batch], prompts.labels[:batch], prompts.noise[:batch])
    best = dict.fromkeys(samplers, math.inf)
    for _ in range(rounds):
        for name, (model, cached) in samplers.items():
            start = time.perf_counter()
            sample(cached.model if cached else model, score.sampler, first, score.guidance, batch=batch,
                   on_start=cached.start if cached else None)
            best[name] = min(best[name], (time.perf_counter() - start) / batch)
    return best


def label(cache: StepCacheConfig) -> str:
    """How rows name a cache setting, e.g. "dbcache 0.08"."""
    return f"{cache.mode} {cache.threshold:g}"


def cache_arms(models: dict[str, nn.Module], scores: dict[str, dict[str, float]], score: Scorer,
               caches: list[StepCacheConfig], batch: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rows for every model of `models` (static first, then dynamic arms by name), uncached and under
    each cache setting: prompt score, FD, seconds per image, speed-up against static, share of steps
    reused; and the samples of each cached arm. `scores` holds each model's uncached prompt score and
    FD (measured by the main bench)."""
    steps = score.sampler["steps"]
    samplers: dict[str, tuple[nn.Module, _CachedSampler | None]] = {}
    rows: dict[str, dict[str, Any]] = {}
    reused: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}
    for name, model in models.items():
        rows[name] = {key: scores[name][key] for key in ("prompt_score", "fd")}
        samplers[name] = (model, None)
        for cache in caches:
            cached, named = _CachedSampler(model, cache, steps), f"{name} + {label(cache)}"
            samples[named] = sample(cached.model, score.sampler, score.prompts, score.guidance, batch=batch,
                                    on_start=cached.start, on_end=cached.end)
            reused[named] = _decisions(cached.reused, steps)
            rows[named] = score.image_scores(samples[named]) | {"cached_share": float(reused[named].float().mean())}
            samplers[named] = (model, cached)
    for name, decisions in reused.items():
        static = reused[f"static + {name.split(' + ')[1]}"]
        if not name.startswith("static"):
            rows[name]["agreement_with_static"] = float((decisions == static).float().mean())
    seconds = _seconds_per_image(samplers, score, batch)
    for name, row in rows.items():
        row |= {"s_per_image": seconds[name], "speedup": seconds["static"] / seconds[name]}
    return {"settings": [cache.model_dump() for cache in caches], "labels": [label(cache) for cache in caches],
            "batch": batch, "rows": rows}, samples


def cache_goals(result: dict[str, Any]) -> dict[str, Goal]:
    """Speed-ups multiply (combined ≥ 0.9 × cache × fast path, per λ and setting); at λ 0.7 under the
    first setting (cache-dit's default threshold unless told otherwise) the cached dynamic model keeps
    the static model's prompt score (−3 points) and the cached static model's FD (+10 %)."""
    cache = result["cache"]
    rows, goals = cache["rows"], {}
    dynamic = [name for name in rows if name.startswith("dynamic") and " + " not in name]
    for index, setting in enumerate(cache["labels"]):
        alone = rows[f"static + {setting}"]["speedup"]
        for name in dynamic:
            both, lam = rows[f"{name} + {setting}"], name.removeprefix("dynamic λ=")
            goals[f"λ {lam} + {setting}: speed-up ÷ (cache × fast)"] = Goal(
                both["speedup"] / (alone * rows[name]["speedup"]), ">=", 0.9)
            if float(lam) == 0.7 and index == 0:
                goals[f"λ 0.7 + {setting}: prompt score vs static"] = Goal(
                    both["prompt_score"] - rows["static"]["prompt_score"], ">=", -0.03, "−3 points")
                goals[f"λ 0.7 + {setting}: FD vs static + {setting}"] = Goal(
                    both["fd"] / rows[f"static + {setting}"]["fd"] - 1, "<=", 0.10, "+10 %")
    return goals


def cache_cause(name: str, result: dict[str, Any]) -> str:
    """Why a cache goal was missed, from the rows it compares."""
    rows = result["cache"]["rows"]
    lam, setting = name.split(":")[0].removeprefix("λ ").split(" + ")
    dynamic = f"dynamic λ={lam}"
    both, static = rows[f"{dynamic} + {setting}"], rows[f"static + {setting}"]
    return (f"static + {setting} {static['speedup']:.2f}× reusing {static['cached_share']:.0%} of steps; {dynamic} "
            f"{rows[dynamic]['speedup']:.2f}×; both {both['speedup']:.2f}× reusing {both['cached_share']:.0%} "
            f"({both['agreement_with_static']:.0%} of decisions as static); prompt {100 * both['prompt_score']:.1f}% "
            f"vs static {100 * rows['static']['prompt_score']:.1f}%, FD {both['fd']:.2f} vs {static['fd']:.2f}")


def print_cache_table(result: dict[str, Any]) -> None:
    cache = result["cache"]
    first = cache["settings"][0]
    print(f"step caches {', '.join(cache['labels'])} (cache threshold): first {first['fn']} / last {first['bn']} "
          f"blocks always computed, {first['warmup']} warm-up steps; batches of {cache['batch']} images, timed over "
          "whole generations")
    print(f"{'arm':<30}{'prompt':>8}{'FD':>8}{'s/image':>10}{'speed-up':>10}{'reused':>8}{'as static':>11}")
    for name, row in cache["rows"].items():
        reused = f"{row['cached_share']:.0%}" if "cached_share" in row else ""
        agree = f"{row['agreement_with_static']:.0%}" if "agreement_with_static" in row else ""
        print(f"{name:<30}{100 * row['prompt_score']:>7.1f}%{row['fd']:>8.2f}{row['s_per_image']:>10.4f}"
              f"{row['speedup']:>9.2f}×{reused:>8}{agree:>11}")
