"""Step caching with cache-dit on top of the fast path (the optional `cache` extra).

A step cache and DyDiT save different compute, so their savings multiply. DBCache runs the first
`fn` blocks of every step; when their output moved by less than `threshold` (relative L1) since the
last fully computed step, it skips the middle blocks and adds their cached residual instead, then
runs the last `bn` blocks. DyDiT makes the blocks that do run narrower. TaylorSeer (on top of
DBCache) extrapolates the cached residual to first order instead of reusing it as it was.

Why this is safe with the fast path:
- the fast model sets each step's masks in a forward pre-hook, before cache-dit swaps in its block
  list, so every block that runs uses the current step's masks, and a skipped block leaves no state;
- the decision reads the first `fn` blocks, which are narrow at the steps the routers found easy:
  where the schedule changes their masks between two steps, their output jumps and the step is
  computed, so a width change costs cache hits, never a stale residual;
- `warmup` steps are never cached: the early, high-noise steps change the image most, and cache-dit
  needs one computed step before the first reuse anyway.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from dydit_scale.config import StepCacheConfig

__all__ = ["block_counts", "cache_problem", "cached_steps", "check_step_cache", "enable_step_cache", "family_problem",
           "refresh_step_cache", "with_overrides"]

#: family -> the block lists cache-dit wraps, in forward order
_BLOCK_LISTS = {"flux": ("transformer_blocks", "single_transformer_blocks"), "pixart": ("transformer_blocks",),
                "dit": ("transformer_blocks",), "sit": ("transformer_blocks",)}
#: cache-dit 1.5.3's first-order TaylorSeer forms its first derivative at the 4th computed step of a
#: process's first generation (the 3rd of later ones): fewer warm-up steps and it never extrapolates
TAYLORSEER_WARMUP = 4
_UNSUPPORTED = {"latte": "its forward interleaves spatial and temporal blocks (transformer_blocks[i], then "
                         "temporal_transformer_blocks[i]) in one loop, and cache-dit caches whole block lists"}


def with_overrides(base: StepCacheConfig, overrides: dict[str, Any]) -> StepCacheConfig:
    """`base` with some fields replaced, checked as the recipe checks them; one-line ValueError."""
    from pydantic import ValidationError

    try:
        return StepCacheConfig(**base.model_dump() | overrides)
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(f"cache {first['loc'][0]}: {first['msg']}, got {first['input']!r}") from None


def family_problem(family: str) -> str | None:
    """Why cache-dit cannot cache `family`, or None."""
    if family in _UNSUPPORTED:
        return f"{family}: cache-dit cannot cache this family: {_UNSUPPORTED[family]}"
    return None


def block_counts(family: str, config: dict[str, Any]) -> dict[str, int]:
    """Blocks per cached list, from the transformer's config.json (lists it does not size are left out)."""
    keys = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}
    return {name: config[keys[name]] for name in _BLOCK_LISTS.get(family, ()) if keys[name] in config}


def cache_problem(family: str, counts: dict[str, int], cache: StepCacheConfig) -> str | None:
    """Why `cache` cannot run on this family and block layout (one line), or None."""
    if cache.mode == "none":
        return None
    problem = family_problem(family)
    if problem is not None:
        return problem
    if cache.mode == "taylorseer" and cache.warmup < TAYLORSEER_WARMUP:
        return (f"warmup {cache.warmup}: taylorseer extrapolates from the steps computed before the first reuse "
                f"and needs at least {TAYLORSEER_WARMUP} warm-up steps; with fewer it only reuses, as dbcache does")
    for name, count in counts.items():
        if cache.fn + cache.bn >= count:
            return (f"fn {cache.fn} + bn {cache.bn} blocks always run, but {name} has {count}: nothing left to "
                    f"cache; lower fn or bn below {count} in total")
    return None


def check_step_cache(transformer: nn.Module, family: str, cache: StepCacheConfig) -> None:
    """Raise ValueError (one line) if `cache` cannot run on this family and transformer's blocks."""
    counts = {name: len(getattr(transformer, name)) for name in _BLOCK_LISTS.get(family, ())}
    problem = cache_problem(family, counts, cache)
    if problem is not None:
        raise ValueError(problem)


def _cache_dit() -> Any:
    """cache-dit, its loggers quiet unless CACHE_DIT_LOG_LEVEL says otherwise: they print an INFO line per
    wrapped block, on stdout, where a bench's --json goes."""
    quiet = "CACHE_DIT_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["CACHE_DIT_LOG_LEVEL"] = "error"
    try:
        import cache_dit
    except ImportError:
        raise ValueError("cache-dit is not installed: pip install 'dydit_scale[cache]'") from None
    if quiet:  # loggers made before the variable was set (cache-dit imported elsewhere first)
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if name.startswith("cache_dit") and isinstance(logger, logging.Logger):
                logger.setLevel(logging.ERROR)
    return cache_dit


def _dit_functor() -> Any:
    """cache-dit's DiT patch (the stock forward reads block 0's embedder after the blocks, which the
    cached block list hides), also for our dynamic DiT subclasses, which live outside diffusers."""
    from cache_dit.caching.patch_functors import DiTPatchFunctor

    class DynamicDiTPatchFunctor(DiTPatchFunctor):
        @classmethod
        def is_from_diffusers(cls, transformer: nn.Module) -> bool:
            return True

    return DynamicDiTPatchFunctor()


def enable_step_cache(target: Any, family: str, cache: StepCacheConfig, *,
                      computed_steps: list[int] | None = None) -> nn.Module:
    """Wrap the transformer of a pipeline (or a transformer alone, then `refresh_step_cache` before
    each generation) in cache-dit's step cache; returns the transformer. Raises ValueError (one line)
    for a family or block layout the cache cannot run; mode none leaves the model as it is.

    computed_steps: a fixed plan instead of the threshold, 1 = compute the step, 0 = reuse (for timing
    models whose random weights make the threshold's decisions meaningless).
    """
    transformer = getattr(target, "transformer", target)
    check_step_cache(transformer, family, cache)
    if cache.mode == "none":
        return transformer
    cache_dit = _cache_dit()
    names = _BLOCK_LISTS[family]
    pattern = cache_dit.ForwardPattern.Pattern_1 if family == "flux" else cache_dit.ForwardPattern.Pattern_3
    adapter = cache_dit.BlockAdapter(
        pipe=None if target is transformer else target, transformer=transformer,
        blocks=[getattr(transformer, name) for name in names] if len(names) > 1 else getattr(transformer, names[0]),
        forward_pattern=[pattern] * len(names) if len(names) > 1 else pattern,
        patch_functor=_dit_functor() if family in ("dit", "sit") else None, check_forward_pattern=True)
    config = cache_dit.DBCacheConfig(Fn_compute_blocks=cache.fn, Bn_compute_blocks=cache.bn,
                                     residual_diff_threshold=cache.threshold, max_warmup_steps=cache.warmup,
                                     enable_separate_cfg=False,  # every family runs both CFG halves as one batch
                                     steps_computation_mask=computed_steps,
                                     steps_computation_policy="dynamic" if computed_steps is None else "static")
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if cache.mode == "taylorseer" else None
    cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)
    return transformer


def refresh_step_cache(transformer: nn.Module, steps: int) -> None:
    """Start a new generation of `steps` steps on a transformer cached alone (a pipeline does this itself)."""
    _cache_dit().refresh_context(transformer, num_inference_steps=steps)


def cached_steps(transformer: nn.Module) -> list[int]:
    """Indices of the steps the last generation took from the cache."""
    stats = _cache_dit().summary(transformer, logging=False)
    return sorted(stats[0].cached_steps) if stats else []
