"""`dydit-data synth --tiny-model FAMILY OUT`: a random-init tiny diffusers pipeline folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from dydit_scale.models.registry import FAMILY_MODULES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny-model", choices=tuple(FAMILY_MODULES),
                        help="write a random-init tiny diffusers pipeline of this family to OUT")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def run_model(args: argparse.Namespace) -> int:
    from dydit_scale.models.tiny import write_tiny_pipeline

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not (out / "model_index.json").is_file():
            print(f"{out}: exists and is not a pipeline folder; choose an empty or new folder")
            return 2
    write_tiny_pipeline(args.tiny_model, str(out), seed=args.seed)
    print(f"wrote tiny {args.tiny_model} pipeline to {out}")
    return 0
