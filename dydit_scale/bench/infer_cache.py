"""`dydit-bench infer --cache`: the stock and the fast path again under cache-dit's step cache (speed only).

The bench's models have random weights, so the cache's threshold would decide nothing meaningful:
the cached paths follow a fixed plan instead, computing the first step and every other one after it
and reusing the rest (a computed step runs every block; a reused one only the first `fn` and last
`bn`). Both cached paths are copies that share the weights of the uncached ones, so each speed-up is
measured against the same stock model in the same alternating rounds: the cache's alone, the fast
path's alone, and both together, which should be close to their product.
"""

from __future__ import annotations

import copy

from torch import nn

from dydit_scale.bench.goals import Goal
from dydit_scale.config import StepCacheConfig
from dydit_scale.infer.fast import weight_sharing_memo
from dydit_scale.infer.step_cache import enable_step_cache, refresh_step_cache

__all__ = ["CACHED", "cached_paths", "combined_goal", "computed_plan", "refresh"]

#: cached path -> the path it copies
CACHED = {"static+cache": "static", "fast+cache": "fast"}


def computed_plan(steps: int) -> list[int]:
    """1 = compute: the first step and every other one after it."""
    return [1 if index % 2 == 0 else 0 for index in range(steps)]


def cached_paths(paths: dict[str, nn.Module], family: str, cache: StepCacheConfig,
                 steps: int) -> dict[str, nn.Module]:
    """`static+cache` and `fast+cache`: the static and fast models again (weights and the fast path's
    sliced weights shared, not copied) under the step cache with `computed_plan(steps)`. Raises ValueError if the layout cannot be cached."""
    out = {}
    for name, source in CACHED.items():
        model = paths[source]
        out[name] = enable_step_cache(copy.deepcopy(model, weight_sharing_memo(model)), family, cache,
                                      computed_steps=computed_plan(steps))
    return out


def refresh(paths: dict[str, nn.Module], steps: int) -> None:
    """Start a new generation on every cached path (before each pass over the steps)."""
    for name in CACHED:
        if name in paths:
            refresh_step_cache(paths[name], steps)


def combined_goal(seconds: dict[str, float]) -> Goal:
    """Cache and fast path together keep ≥ 90 % of the product of their speed-ups."""
    cache, fast, both = (seconds["static"] / seconds[name] for name in ("static+cache", "fast", "fast+cache"))
    return Goal(both / (cache * fast), ">=", 0.90, "0.90")
