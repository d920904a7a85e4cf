"""`dydit-bench`: side-by-side measurements printed as a table (or `--json`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from dydit_scale.help_format import DefaultsHelpFormatter

#: sub-command -> module with `add_arguments(parser)` and `run(args) -> int`
BENCHES = {"data": "dydit_scale.bench.data", "train": "dydit_scale.bench.train", "infer": "dydit_scale.bench.infer",
           "efficacy": "dydit_scale.bench.efficacy", "memory": "dydit_scale.bench.memory",
           "gpu-check": "dydit_scale.bench.gpu_check"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dydit-bench", description=__doc__,
                                     formatter_class=DefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="bench", required=True)
    for name, module_name in BENCHES.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                                  formatter_class=DefaultsHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
