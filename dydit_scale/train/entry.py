"""The training program's entry: `dydit-train` and `python -m dydit_scale.train` both land here."""

from __future__ import annotations

import argparse
import sys

from dydit_scale.config import RecipeError, load_recipe


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
    from dydit_scale.data.format import DataFormatError
    from dydit_scale.models.loading import ModelFolderError
    from dydit_scale.train.loop import Trainer

    try:
        trainer = Trainer(recipe)
    except (RecipeError, DataFormatError, ModelFolderError) as err:
        print(f"{args.recipe}: {err}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0
