"""`dydit-data`: prepare, check and synthesise data and tiny models for dydit_scale.

    dydit-data pack SRC OUT          folder / CSV / JSONL manifest -> numbered shards + sizes.json
    dydit-data validate SHARDS...    decode every sample; per-shard, per-reason report (exit 1 if bad)
    dydit-data encode ...            VAE latents + text embeddings -> pre-encoded shards
    dydit-data stats SHARDS...       counts, sizes, resolutions
    dydit-data synth --shards {image,video} OUT --count N [--classes N] | --tiny-model {flux,pixart,latte,dit,sit} OUT
    dydit-data synth --replica NAME OUT [--layers N] [--text-layers N] [--dtype fp32|bf16]
                                     a released pipeline (flux-dev, flux-schnell, pixart-alpha-1024,
                                     pixart-alpha-512, latte-1, dit-xl-2-256) at real widths, random
                                     weights, few blocks
"""

from __future__ import annotations

import argparse
import sys

from data_tools import encode, pack, stats, synth_model, synth_shards, validate
from dydit_scale.console import quiet_third_party
from dydit_scale.help_format import DefaultsHelpFormatter

COMMANDS = {
    "pack": (pack, "pack a folder or manifest of images/videos with captions into shards"),
    "validate": (validate, "decode every sample and report bad ones by shard and reason"),
    "encode": (encode, "pre-encode shards: VAE latents and text embeddings from a local pipeline"),
    "stats": (stats, "sample counts, sizes and resolutions of shards"),
}


def _synth(args: argparse.Namespace) -> int:
    if sum(map(bool, (args.tiny_model, args.replica, args.shards))) != 1:
        print("dydit-data synth: give exactly one of --tiny-model FAMILY, --replica NAME or --shards {image,video}",
              file=sys.stderr)
        return 2
    return synth_model.run_model(args) if args.tiny_model or args.replica else synth_shards.run_shards(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dydit-data", description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings that are filtered as known noise")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    synth = commands.add_parser("synth", help="synthetic shards, or a tiny or released-width random-init model folder",
                                formatter_class=DefaultsHelpFormatter)
    synth.add_argument("out", help="output folder")
    synth_model.add_model_arguments(synth)
    synth_shards.add_shard_arguments(synth, with_out=False)
    synth.set_defaults(func=_synth)
    args = parser.parse_args(argv)
    quiet_third_party(verbose=args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
