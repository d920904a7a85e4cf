"""`dydit-data synth --shards {image,video} OUT --count N`: structured synthetic shards.

Coloured shapes whose captions name them ("a small red circle at the top left"), as images of
several aspect ratios or as short drifting-shape mp4s (PyAV, ≥ 64 px wide for decord); written with
`webdataset.ShardWriter` plus sizes.json. With `--classes N`, image samples are class-conditional
(ImageNet style): `.cls` in [0, N) instead of a caption, the class fixing the shape (and colour, ...),
plus `classes.json` beside sizes.json. The generator lives in `dydit_scale.data.synthetic` so
that `dydit-bench data` can use it without importing `data_tools`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as exn:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 96x64, got {text!r}") from exn
    if width < 64 or width % 2 or height % 2:
        raise argparse.ArgumentTypeError(f"expected an even WIDTH >= 64 (decord) and an even HEIGHT, got {text!r}")
    return width, height


def add_shard_arguments(parser: argparse.ArgumentParser, *, with_out: bool = True) -> None:
    """Options of `synth --shards`; pass with_out=False if the parser already declares `out` (and --seed)."""
    if with_out:
        parser.add_argument("out", help="output folder")
    parser.add_argument("--shards", choices=("image", "video"), help="write synthetic shards of this kind to OUT")
    parser.add_argument("--count", type=int, default=64, help="number of samples")
    parser.add_argument("--per-shard", type=int, default=16, help="samples per shard")
    parser.add_argument("--frames", type=int, default=8, help="video: frames per clip")
    parser.add_argument("--video-size", type=_size, default=(96, 64), help="video: WIDTHxHEIGHT (width >= 64)")
    parser.add_argument("--image-format", choices=("jpg", "png", "webp"), default="jpg", help="image encoding")
    parser.add_argument("--classes", type=int, default=None, metavar="N",
                        help="image: class-conditional samples with .cls in [0, N) and no caption, + classes.json")
    if with_out:
        parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")


def run_shards(args: argparse.Namespace) -> int:
    """Write the shards; prints one summary line."""
    from dydit_scale.data.synthetic import MAX_CLASSES, write_synthetic_shards

    if args.count < 1 or args.per_shard < 1:
        print(f"dydit-data synth: --count and --per-shard must be >= 1, got {args.count}, {args.per_shard}",
              file=sys.stderr)
        return 2
    classes = getattr(args, "classes", None)
    if classes is not None and (args.shards != "image" or not 1 <= classes <= MAX_CLASSES):
        print(f"dydit-data synth: --classes needs --shards image and 1 <= N <= {MAX_CLASSES}, got "
              f"--shards {args.shards} --classes {classes}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if any(out.glob("*.tar")):
        print(f"dydit-data synth: {out} already holds shards; choose an empty or new folder", file=sys.stderr)
        return 2
    paths = write_synthetic_shards(
        out, args.shards, args.count, per_shard=args.per_shard, seed=getattr(args, "seed", 0),
        num_frames=args.frames, video_size=args.video_size, image_format=args.image_format, classes=classes,
    )
    what = f"class-conditional image sample(s) of {classes} classes" if classes else f"{args.shards} sample(s)"
    print(f"wrote {args.count} synthetic {what} in {len(paths)} shard(s) to {out}")
    return 0


add_arguments = add_shard_arguments
run = run_shards
