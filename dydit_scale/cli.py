"""Console-script entry points; each parses its arguments and calls one library function.

User errors (recipe, paths, shards) print as one line without a traceback and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from dydit_scale.config import RecipeError, dump_recipe, load_recipe, recipe_fields


def validate(argv: list[str] | None = None) -> int:
    """`dydit-validate RECIPE... [--print] [--explain]`: check recipes without running anything."""
    parser = argparse.ArgumentParser(prog="dydit-validate", description=validate.__doc__)
    parser.add_argument("recipes", nargs="*", help="recipe YAML files")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field (repeatable), e.g. --set optim.lr=5e-5")
    parser.add_argument("--print", dest="show", action="store_true", help="print each resolved recipe")
    parser.add_argument("--explain", action="store_true", help="list every field with its meaning and default")
    args = parser.parse_args(argv)
    if args.explain:
        for name, doc, default in recipe_fields():
            print(f"{name} (default: {default!r})\n    {doc}")
    if not args.recipes and not args.explain:
        parser.error("give at least one RECIPE (or --explain)")
    failed = False
    for path in args.recipes:
        try:
            recipe = load_recipe(path, args.sets)
        except RecipeError as err:
            print(err, file=sys.stderr)
            failed = True
            continue
        if args.show:
            print(f"# {path}\n{dump_recipe(recipe)}")
    if failed:
        return 2
    if args.recipes and not args.show:
        print(f"{len(args.recipes)} recipe(s) valid")
    return 0




def train(argv: list[str] | None = None) -> int:
    """`dydit-train RECIPE [a.b=c ...]`: train under any launcher (deepspeed, torchrun, srun) or alone."""
    from dydit_scale.train.entry import main

    return main(argv)


def _resolution(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    try:
        return int(height), int(width or height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH, got {text!r}") from None


def _zero_state_dict(step_folder):
    """Full fine-tuning weights consolidated from the ZeRO files with DeepSpeed's own tool, weights-only
    (a tampered file is refused with an UnsafeCheckpointError, a ValueError naming it)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dydit_scale.train import safe_load

    safe_load.scan(step_folder)
    with safe_load.forced():
        return get_fp32_state_dict_from_zero_checkpoint(str(step_folder.parent), tag=step_folder.name)


def export(argv: list[str] | None = None) -> int:
    """`dydit-export CHECKPOINT_OR_RUN --steps N [--resolution S|HxW] [--sampler NAME] OUT`: freeze the
    router schedule for a sampler's time keys (schedule.safetensors/.json + schedule.png)."""
    import torch

    parser = argparse.ArgumentParser(prog="dydit-export", description=export.__doc__)
    parser.add_argument("checkpoint", help="a run folder (its newest complete checkpoint) or a step-NNNNNNN folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--steps", type=int, required=True, help="sampler steps")
    parser.add_argument("--resolution", type=_resolution, help="sampling size (default: the recipe's data.resolution)")
    parser.add_argument("--sampler", help="flux: flow_euler; pixart: dpm_solver | ddim; latte: ddim")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the pipeline's dtype (keys follow it)")
    parser.add_argument("--save-transformer", action="store_true", help="also write OUT/transformer (diffusers folder)")
    args = parser.parse_args(argv)
    from dydit_scale.infer.export import export_run

    try:
        schedule = export_run(args.checkpoint, args.out, steps=args.steps, resolution=args.resolution,
                              sampler=args.sampler, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                              save_transformer=args.save_transformer, consolidate=_zero_state_dict)
    except (ValueError, FileNotFoundError) as err:
        print(f"dydit-export: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {schedule.steps} steps, mean FLOPs ratio {float(schedule.flops_ratio.mean()):.3f}")
    return 0


def sample(argv: list[str] | None = None) -> int:
    """`dydit-sample CHECKPOINT_OR_RUN --schedule DIR OUT [--prompt P ...] [--seed S ...]`: sample with the
    fast dynamic transformer; writes a sample grid (videos: mp4s + a frame grid) and a compute map."""
    parser = argparse.ArgumentParser(prog="dydit-sample", description=sample.__doc__)
    parser.add_argument("checkpoint", help="a run folder (its newest complete checkpoint) or a step-NNNNNNN folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--schedule", required=True, help="a folder written by dydit-export")
    parser.add_argument("--prompt", dest="prompts", action="append", help="repeatable (default: the recipe's validation prompts)")
    parser.add_argument("--seed", dest="seeds", action="append", type=int, help="repeatable (default: the recipe's seeds)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the recipe's validation.guidance_scale)")
    parser.add_argument("--low-memory", action="store_true", help="slice weights in every forward instead of caching")
    args = parser.parse_args(argv)
    from dydit_scale.infer.sample import sample_run

    try:
        written = sample_run(args.checkpoint, args.schedule, args.out, prompts=args.prompts, seeds=args.seeds,
                             guidance=args.guidance, low_memory=args.low_memory, consolidate=_zero_state_dict)
    except (ValueError, FileNotFoundError) as err:
        print(f"dydit-sample: {err}", file=sys.stderr)
        return 2
    print(f"{written.grid}\n{written.compute_map}" + "".join(f"\n{v}" for v in written.videos))
    return 0
