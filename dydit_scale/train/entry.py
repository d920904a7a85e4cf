"""The training program's entry: `dydit-train` and `python -m dydit_scale.train` both land here."""

from __future__ import annotations

import argparse
import sys

from dydit_scale.config import RecipeError, load_recipe

_CLEANUP_S = 20.0  # a failed run's cleanup (loader workers, logs) gets this long before a hard exit


def main(argv: list[str] | None = None) -> int:
    """`dydit-train RECIPE [a.b=c ...]`: train under any launcher (deepspeed, torchrun, srun) or alone."""
    parser = argparse.ArgumentParser(prog="dydit-train", description=main.__doc__)
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="field overrides, e.g. train.steps=10 optim.lr=5e-5")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(err, file=sys.stderr)
        return 2
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
        message = f"{args.recipe}: {line} [{where}]"
        code = 130 if interrupted else failure.EXIT_CODE
        failure.exit_within(_CLEANUP_S, code, message)
        if trainer is not None:
            trainer.abort(line)  # first, so that the progress bar is closed before the line is printed
        print(message, file=sys.stderr, flush=True)
        failure.exit_now(code)
    trainer.close()
    return 0
