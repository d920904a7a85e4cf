"""`dydit-data`: prepare, check and synthesise data and tiny models for dydit_scale."""

from __future__ import annotations

import argparse
import sys

from data_tools import synth_model


def _synth(args: argparse.Namespace) -> int:
    if args.tiny_model:
        return synth_model.run_model(args)
    print("dydit-data synth: give --tiny-model FAMILY", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dydit-data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="synthetic shards or a tiny random-init model folder")
    synth.add_argument("out", help="output folder")
    synth_model.add_model_arguments(synth)
    synth.set_defaults(func=_synth)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
