"""`dydit-data synth --tiny-model FAMILY OUT` / `--replica NAME OUT`: a random-init diffusers pipeline folder.

A tiny model is a few-KB pipeline for fast tests; a replica is a released pipeline (FLUX.1, PixArt-α,
Latte-1, DiT-XL/2) at its real widths and folder layout with fewer blocks, for memory and layout checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dydit_scale.models.registry import FAMILY_MODULES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny-model", choices=tuple(FAMILY_MODULES),
                        help="write a random-init tiny diffusers pipeline of this family to OUT")
    parser.add_argument("--replica", metavar="NAME",
                        help="write a released pipeline at its real widths with random weights and few blocks "
                             "to OUT (flux-dev, flux-schnell, pixart-alpha-1024, pixart-alpha-512, latte-1, dit-xl-2-256)")
    parser.add_argument("--layers", type=int, metavar="N", help="replica: blocks per transformer stack (default: the replica's)")
    parser.add_argument("--text-layers", type=int, default=1, metavar="N", help="replica: layers per text encoder")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="replica: weight dtype on disk")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def run_model(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.replica:
        return _run_replica(args, out)
    from dydit_scale.models.tiny import write_tiny_pipeline

    if out.exists() and any(out.iterdir()):
        if not (out / "model_index.json").is_file():
            print(f"{out}: exists and is not a pipeline folder; choose an empty or new folder")
            return 2
    write_tiny_pipeline(args.tiny_model, str(out), seed=args.seed)
    print(f"wrote tiny {args.tiny_model} pipeline to {out}")
    return 0


def _run_replica(args: argparse.Namespace, out: Path) -> int:
    """Write the replica; one summary line, or one error line (exit 2)."""
    from dydit_scale.models.registry import get_replica
    from dydit_scale.models.replica_write import write_replica

    try:
        _, replica = get_replica(args.replica)
        if (args.layers is not None and args.layers < 1) or args.text_layers < 1:
            raise ValueError(f"--layers and --text-layers must be >= 1, got {args.layers}, {args.text_layers}")
        write_replica(args.replica, out, layers=args.layers, text_layers=args.text_layers, dtype=args.dtype,
                      seed=args.seed)
    except ValueError as err:
        print(f"dydit-data synth: {err}", file=sys.stderr)
        return 2
    layers = replica.default_layers if args.layers is None else args.layers
    print(f"wrote {args.replica} replica ({args.dtype}, {layers} block(s) per stack, {args.text_layers} text "
          f"layer(s)) to {out}: {component_summary(out)}")
    return 0


def component_summary(folder: Path) -> str:
    """'transformer 1.09 GB in 3 shards, vae 0.17 GB, ...': the weight files of each component."""
    parts = []
    for component in sorted(path for path in folder.iterdir() if path.is_dir()):
        files = list(component.glob("*.safetensors"))
        if files:
            size = sum(file.stat().st_size for file in files) / 1e9
            parts.append(f"{component.name} {size:.2f} GB" + (f" in {len(files)} shards" if len(files) > 1 else ""))
    return ", ".join(parts)
