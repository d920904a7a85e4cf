"""`dydit-data stats SHARDS...`: what the shards hold, and (with --write-sizes) their sizes.json.

Reads each shard once without decoding pixels: sample kinds, bytes, caption lengths, image sizes
from the file headers, video frame counts and sizes from decord's index, and for class-conditional
samples the class indices (`.cls`, read by the loader's own reader; unreadable ones are counted as
`bad_labels`). Useful to choose
`data.resolution`, `num_frames` and the bucket range, and to (re)write sizes.json for shards that
were not written by `dydit-data pack`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections import Counter, defaultdict
from typing import Any

from data_tools import shard_paths
from dydit_scale.data.format import (
    CLASS_EXT, IMAGE_EXTS, VIDEO_EXTS, DataFormatError, read_class, sample_kind, write_sizes,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="shard folders, brace patterns, globs or .tar files")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--write-sizes", action="store_true",
                        help="write the counted samples into each folder's sizes.json")


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "mean": round(sum(values) / len(values), 2), "max": max(values)}


def _media_size(sample: dict[str, Any], kind: str) -> tuple[int, int, int] | None:
    """(width, height, frames) from the image header / the decord index; None when unreadable."""
    if kind == "image":
        from PIL import Image, UnidentifiedImageError

        data = next(sample[e] for e in IMAGE_EXTS if e in sample)
        try:
            width, height = Image.open(io.BytesIO(data)).size
        except (UnidentifiedImageError, OSError, ValueError):
            return None
        return width, height, 1
    if kind == "video":
        import decord

        data = next(sample[e] for e in VIDEO_EXTS if e in sample)
        try:
            reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
            height, width = reader[0].shape[:2]
        except (decord.DECORDError, RuntimeError, IndexError):
            return None
        return width, height, len(reader)
    return None


def shard_stats(path: str) -> dict[str, Any]:
    """Counts and distributions of one shard."""
    import webdataset as wds

    errors: list[Exception] = []
    kinds: Counter[str] = Counter()
    values: dict[str, list[float]] = defaultdict(list)
    samples = bad_labels = 0
    classes: set[int] = set()

    def keep(exn: Exception) -> bool:
        errors.append(exn)
        return True

    for sample in wds.tarfile_to_samples(handler=keep)(iter([{"url": path}])):
        samples += 1
        try:
            kind = sample_kind(sample)
        except DataFormatError:
            kind = "no_media"
        kinds[kind] += 1
        values["bytes"].append(sum(len(v) for k, v in sample.items() if isinstance(v, bytes)))
        if "txt" in sample:
            values["caption_words"].append(len(sample["txt"].decode("utf-8", "replace").split()))
        if CLASS_EXT in sample:
            try:
                label = read_class(sample)
            except DataFormatError:
                bad_labels += 1
            else:
                values["label"].append(label)
                classes.add(label)
        size = _media_size(sample, kind)
        if size is not None:
            values["width"].append(size[0])
            values["height"].append(size[1])
            values["aspect"].append(round(size[0] / size[1], 3))
            if kind == "video":
                values["frames"].append(size[2])
    labels = {"labelled": len(values.get("label", [])), "classes": len(classes), "bad_labels": bad_labels}
    return {"samples": samples, "kinds": dict(kinds), "corrupt": bool(errors),
            **(labels if values.get("label") or bad_labels else {}),
            **{name: _summary(v) for name, v in values.items()}}


def run(args: argparse.Namespace) -> int:
    """Print per-shard and total statistics; optionally write sizes.json."""
    paths = shard_paths(args.shards, "stats")
    if paths is None:
        return 2
    shards = {path: shard_stats(path) for path in paths}
    if args.write_sizes:
        by_folder: dict[str, dict[str, int]] = defaultdict(dict)
        for path, stats in shards.items():
            by_folder[os.path.dirname(os.path.abspath(path))][os.path.basename(path)] = stats["samples"]
        for folder, sizes in by_folder.items():
            write_sizes(folder, sizes)
    kinds: Counter[str] = Counter()
    for stats in shards.values():
        kinds.update(stats["kinds"])
    total = {"shards": len(shards), "samples": sum(s["samples"] for s in shards.values()), "kinds": dict(kinds),
             "bytes": sum(s.get("bytes", {}).get("mean", 0) * s["samples"] for s in shards.values()),
             "labelled": sum(s.get("labelled", 0) for s in shards.values())}
    if args.json:
        print(json.dumps({"total": total, "shards": shards}, indent=1))
        return 0
    print("\n".join(_table(shards, total)))
    return 0


def _span(stats: dict[str, Any], name: str) -> str:
    """`min-max` of one distribution (a single number when they agree), `-` when there is none."""
    if not stats.get(name):
        return "-"
    low, high = stats[name]["min"], stats[name]["max"]
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def _kinds(kinds: dict[str, int]) -> str:
    """`7 image, 2 without media`: sample counts by kind, in words."""
    words = {"no_media": "without media"}
    return ", ".join(f"{count} {words.get(kind, kind)}" for kind, count in sorted(kinds.items())) or "none"


def _table(shards: dict[str, dict[str, Any]], total: dict[str, Any]) -> list[str]:
    """Aligned lines: one per shard, then the total; ranges are min-max over the shard's samples."""
    names = [os.path.basename(path) for path in shards]
    width = max([len("shard"), len("total"), *map(len, names)])
    lines = [f"{'shard':<{width}} {'samples':>8} {'MB':>8} {'width px':>11} {'height px':>11} {'frames':>9} "
             f"{'caption words':>13} {'class ids':>11}  kinds"]
    for name, s in zip(names, shards.values()):
        mb = s.get("bytes", {}).get("mean", 0) * s["samples"] / 1e6
        lines.append(f"{name:<{width}} {s['samples']:>8} {mb:>8.1f} {_span(s, 'width'):>11} {_span(s, 'height'):>11} "
                     f"{_span(s, 'frames'):>9} {_span(s, 'caption_words'):>13} {_span(s, 'label'):>11}  "
                     f"{_kinds(s['kinds'])}"
                     + (f"  ({s['bad_labels']} unreadable .cls)" if s.get("bad_labels") else "")
                     + ("  (corrupt tar: read up to the damage)" if s["corrupt"] else ""))
    lines.append(f"{'total':<{width}} {total['samples']:>8} {total['bytes'] / 1e6:>8.1f} {'':>11} {'':>11} {'':>9} "
                 f"{'':>13} {'':>11}  {_kinds(total['kinds'])}")
    return lines
