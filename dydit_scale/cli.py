"""Console-script entry points; each parses its arguments and calls one library function.

User errors (recipe, paths, shards) print as one line without a traceback and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from dydit_scale.config import RecipeError, dump_recipe, recipe_choices, recipe_fields, split_overrides
from dydit_scale.help_format import DefaultsHelpFormatter
from dydit_scale.train.consolidate import zero_state_dict as _zero_state_dict
from dydit_scale.train.recipe_checks import load_checked_recipe


def _positive_int(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _validate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dydit-validate", description=validate.__doc__,
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="RECIPE | KEY=VALUE",
                        help="recipe YAML files, and field overrides applied to each, e.g. optim.lr=5e-5")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field (repeatable; applied after the positional overrides)")
    parser.add_argument("--offline", action="store_true",
                        help="check only what the recipe itself decides, for a run on another machine: skips "
                             "the model folder, shards, resume checkpoint and CUDA/xformers checks")
    parser.add_argument("--world-size", type=_positive_int, default=1,
                        help="ranks the run will use (the shards must feed every rank and data worker)")
    parser.add_argument("--print", dest="show", action="store_true", help="print each resolved recipe")
    parser.add_argument("--explain", action="store_true",
                        help="list every field with its meaning, default and allowed values")
    return parser


def _explain() -> None:
    choices = recipe_choices()
    for name, doc, default in recipe_fields():
        allowed = f"; one of {' | '.join(str(c) for c in choices[name])}" if name in choices else ""
        print(f"{name} ({'required' if default is ... else f'default: {default!r}'}{allowed})\n    {doc}")


def validate(argv: list[str] | None = None) -> int:
    """`dydit-validate RECIPE... [a.b=c ...] [--set a.b=c ...]`: check recipes against every rule
    `dydit-train` applies at start-up, without running anything."""
    parser = _validate_parser()
    args = parser.parse_intermixed_args(argv)
    recipes, overrides = split_overrides(args.args)
    if args.explain:
        _explain()
    if not recipes and not args.explain:
        parser.error("give at least one RECIPE (or --explain)")
    failed = False
    for path in recipes:
        try:
            recipe = load_checked_recipe(path, overrides + args.sets, world_size=args.world_size,
                                         offline=args.offline)
        except RecipeError as err:
            print(err, file=sys.stderr)
            failed = True
            continue
        if args.show:
            print(f"# {path}\n{dump_recipe(recipe)}")
    if failed:
        return 2
    if recipes and not args.show:
        print(f"{len(recipes)} recipe(s) valid" + (" (offline: files, shards and CUDA not checked)" if args.offline else ""))
    return 0


def train(argv: list[str] | None = None) -> int:
    """`dydit-train RECIPE [a.b=c ...] [--set a.b=c ...]`: train under any launcher (deepspeed, torchrun,
    srun) or alone."""
    from dydit_scale.train.entry import main

    return main(argv)


_VERBOSE_HELP = "show third-party warnings that are filtered as known noise"
#: --dtype name -> torch dtype name
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _resolution(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    try:
        return int(height), int(width or height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH, got {text!r}") from None


def export(argv: list[str] | None = None) -> int:
    """`dydit-export CHECKPOINT_OR_RUN --steps N [--resolution S|HxW] [--sampler NAME] OUT`: freeze the
    router schedule for a sampler's time keys (schedule.safetensors/.json + schedule.png)."""
    import torch

    parser = argparse.ArgumentParser(prog="dydit-export", description=export.__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a run folder (its newest complete checkpoint) or a step-NNNNNNN folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--steps", type=int, required=True, help="sampler steps")
    parser.add_argument("--resolution", type=_resolution, help="sampling size (default: the recipe's data.resolution)")
    parser.add_argument("--sampler", help="flux: flow_euler; pixart: dpm_solver | ddim; latte: ddim; dit: ddim | dpm_solver; sit: flow_euler")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="fp32",
                        help="the pipeline's dtype (keys follow it) and that of --save-transformer's weights")
    parser.add_argument("--save-transformer", action="store_true",
                        help="also write OUT/transformer, a stock diffusers folder (LoRA merged, routers left out)")
    parser.add_argument("--max-shard-size", default="10GB", help="largest safetensors shard of --save-transformer")
    parser.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    args = parser.parse_args(argv)
    from dydit_scale.infer.export import export_run, ratio_warning
    from dydit_scale.console import quiet_third_party

    quiet_third_party(verbose=args.verbose)
    try:
        schedule = export_run(args.checkpoint, args.out, steps=args.steps, resolution=args.resolution,
                              sampler=args.sampler, dtype=getattr(torch, _DTYPES[args.dtype]),
                              save_transformer=args.save_transformer, max_shard_size=args.max_shard_size,
                              consolidate=_zero_state_dict)
    except (ValueError, FileNotFoundError) as err:
        print(f"dydit-export: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {schedule.steps} steps, mean FLOPs ratio {float(schedule.flops_ratio.mean()):.3f}")
    warning = ratio_warning(schedule)
    if warning:
        print(f"dydit-export: warning: {warning}", file=sys.stderr)
    if args.save_transformer:
        print(f"{args.out}/transformer: {schedule.model_class}.from_pretrained loads it ({args.dtype})")
    return 0


def sample(argv: list[str] | None = None) -> int:
    """`dydit-sample CHECKPOINT_OR_RUN --schedule DIR OUT [--prompt P ...] [--seed S ...]`: sample with the
    fast dynamic transformer; writes a sample grid (videos: mp4s + a frame grid) and a compute map."""
    parser = argparse.ArgumentParser(prog="dydit-sample", description=sample.__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a run folder (its newest complete checkpoint) or a step-NNNNNNN folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--schedule", required=True, help="a folder written by dydit-export")
    parser.add_argument("--prompt", dest="prompts", action="append", help="repeatable (default: the recipe's validation prompts); dit: a class index or class name")
    parser.add_argument("--seed", dest="seeds", action="append", type=int, help="repeatable (default: the recipe's seeds)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the recipe's validation.guidance_scale)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the schedule's; others only where the "
                        "schedule holds their time keys)")
    parser.add_argument("--resolution", type=_resolution, help="SIZE or HEIGHTxWIDTH (default: the schedule's; "
                        "others only where the schedule holds their time keys)")
    parser.add_argument("--low-memory", action="store_true", help="slice weights in every forward instead of caching")
    cache = parser.add_argument_group("step cache (cache-dit, the `cache` extra; default: the recipe's validation.cache)")
    cache.add_argument("--cache", dest="mode", choices=recipe_choices()["validation.cache.mode"],
                       help="dbcache: reuse the middle blocks' residual on steps whose first blocks barely changed; "
                            "taylorseer: dbcache that extrapolates that residual (flux, pixart, dit, sit)")
    cache.add_argument("--cache-threshold", dest="threshold", type=float, metavar="X",
                       help="relative change of the first blocks' output below which a step is reused")
    cache.add_argument("--cache-fn", dest="fn", type=int, metavar="N", help="first blocks every step computes")
    cache.add_argument("--cache-bn", dest="bn", type=int, metavar="N", help="last blocks every step computes")
    cache.add_argument("--cache-warmup", dest="warmup", type=int, metavar="N", help="first sampler steps never reused")
    parser.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    args = parser.parse_args(argv)
    from dydit_scale.infer.sample import sample_run
    from dydit_scale.console import bar_safe_logging, quiet_third_party

    quiet_third_party(verbose=args.verbose)
    cache = {key: getattr(args, key) for key in ("mode", "threshold", "fn", "bn", "warmup")
             if getattr(args, key) is not None}
    try:
        with bar_safe_logging():
            written = sample_run(args.checkpoint, args.schedule, args.out, prompts=args.prompts, seeds=args.seeds,
                                 guidance=args.guidance, steps=args.steps, resolution=args.resolution,
                                 low_memory=args.low_memory, consolidate=_zero_state_dict, cache=cache)
    except (ValueError, FileNotFoundError) as err:
        print(f"dydit-sample: {err}", file=sys.stderr)
        return 2
    print(f"{written.grid}\n{written.compute_map}" + "".join(f"\n{v}" for v in written.videos))
    if any(written.cached):
        share = sum(map(len, written.cached)) / len(written.cached)
        print(f"step cache: {share:.1f} steps per sample reused ({', '.join(str(len(c)) for c in written.cached)})")
    return 0
