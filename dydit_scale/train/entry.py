"""The training program's entry: `dydit-train` and `python -m dydit_scale.train` both land here."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dydit_scale.config import Recipe, RecipeError, load_recipe, split_overrides
from dydit_scale.help_format import DefaultsHelpFormatter

_CLEANUP_S = 20.0  # a failed run's cleanup (loader workers, logs) gets this long before a hard exit


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dydit-train", description=main.__doc__,
                                     usage="%(prog)s [-h] RECIPE [KEY=VALUE ...] [--set KEY=VALUE ...]",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("args", nargs="+", metavar="RECIPE | KEY=VALUE",
                        help="the recipe YAML file, then field overrides, e.g. train.steps=10 optim.lr=5e-5")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field (repeatable; applied after the positional overrides)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`dydit-train RECIPE [a.b=c ...] [--set a.b=c ...]`: train under any launcher (deepspeed, torchrun,
    srun) or alone. The recipe passes the same checks as `dydit-validate` before anything starts."""
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    recipes, overrides = split_overrides(args.args)
    if len(recipes) != 1:
        parser.error(f"expected one RECIPE and KEY=VALUE overrides, got {' '.join(recipes) or 'no recipe'}")
    try:
        recipe = load_recipe(recipes[0], overrides + args.sets)
    except RecipeError as err:
        print(err, file=sys.stderr)
        return 2
    from dydit_scale import dist
    from dydit_scale.train.env import launch_world_size
    from dydit_scale.train.recipe_checks import recipe_problems

    problems = recipe_problems(recipe, world_size=launch_world_size())
    if problems:  # one line per rank, as for any failed launch
        print(f"{recipes[0]}: {'; '.join(problems)} [rank {dist.rank()}, start-up]", file=sys.stderr)
        return 2
    run_dir = Path(recipe.run.output_dir) / recipe.run.name
    return _run(recipe, recipes[0], run_dir, existed=run_dir.exists())


def _run(recipe: Recipe, recipe_path: str, run_dir: Path, *, existed: bool) -> int:
    """Train; any failure ends this rank with one line (see `failure`), and a start-up failure takes
    back a run folder that this launch created."""
    from dydit_scale import dist
    from dydit_scale.train import failure
    from dydit_scale.train.loop import Trainer

    trainer = None
    try:
        trainer = Trainer(recipe)
        trainer.train()
    except (Exception, KeyboardInterrupt) as err:
        interrupted = isinstance(err, KeyboardInterrupt)
        line = "interrupted" if interrupted else failure.one_line(
            err, traceback_dir=trainer.run_dir if trainer is not None else None, rank=dist.rank())
        where = f"rank {dist.rank()}, after step {trainer.step}" if trainer is not None else f"rank {dist.rank()}, start-up"
        message = f"{recipe_path}: {line} [{where}]"
        code = 130 if interrupted else failure.EXIT_CODE
        failure.exit_within(_CLEANUP_S, code, message)
        if trainer is not None:
            trainer.abort(line)  # first, so that the progress bar is closed before the line is printed
        elif not existed and dist.is_main():
            _remove_new_run_folder(run_dir)
        print(message, file=sys.stderr, flush=True)
        failure.exit_now(code)
    trainer.close()
    return 0


def _remove_new_run_folder(run_dir: Path) -> None:
    """A launch refused at start-up leaves no run folder of its own behind; one that holds a committed
    checkpoint is never removed (another launch of the same run got further)."""
    if run_dir.is_dir() and not any((run_dir / "checkpoints").glob("step-*")):
        shutil.rmtree(run_dir, ignore_errors=True)
