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
