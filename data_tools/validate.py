"""`dydit-data validate SHARDS...`: decode every sample before training ever sees it (shard doctor).

Every sample goes through the same readers the loader uses (`dydit_scale.data.format`), so the
reasons match `batch["skipped"]`: a shard set that validates clean trains without a single skip.
Images are fully decoded; videos are opened with decord, their frame count checked against
`--frames`, and eight frames spread over the clip (the last included) decoded; pre-encoded arrays
are loaded. A `.cls` class label stands in for the caption of an image or pre-encoded sample, as in
the loader. A shard whose tar cannot be read to its end counts one `corrupt_tar`, and a sample count
that differs from sizes.json is reported. Exit code 1 if anything is bad, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from data_tools import shard_paths
from dydit_scale.data.format import (
    IMAGE_EXTS, SKIP_REASONS, VIDEO_EXTS, DataFormatError, check_latent_members, check_size, media_bytes,
    open_video, read_array, read_caption, read_condition, read_image, read_meta, sample_kind, shard_sizes,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="shard folders, brace patterns, globs or .tar files")
    parser.add_argument("--json", action="store_true", help="print one JSON report instead of a table")
    parser.add_argument("--frames", type=int, default=1,
                        help="a clip with fewer frames is video_too_short (num_frames × frame_stride)")
    parser.add_argument("--min-side", type=int, default=0, help="a shorter side below this is too_small")
    parser.add_argument("--quarantine", metavar="FILE",
                        help="write one line per bad sample: shard<TAB>key<TAB>reason<TAB>message")


def check_sample(sample: dict[str, Any], *, min_frames: int, min_side: int) -> None:
    """Raise DataFormatError(reason) if the loader would skip `sample`."""
    kind = sample_kind(sample)
    read_meta(sample)
    if kind == "latent":
        check_latent_members(sample)
        read_condition(sample, caption_required=False)
        for ext in [e for e in sample if e.endswith(".npy")]:
            read_array(sample[ext], what=ext)
        return
    if kind == "image":
        read_condition(sample)
        read_image(media_bytes(sample, IMAGE_EXTS), min_side=min_side)
        return
    read_caption(sample)
    reader = open_video(media_bytes(sample, VIDEO_EXTS), min_frames=min_frames)
    count = len(reader)
    indices = sorted({round(i * (count - 1) / 7) for i in range(8)})
    import decord

    try:
        frames = reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError, ValueError) as exn:
        raise DataFormatError(f"frames undecodable: {exn}", reason="decode_error") from exn
    check_size(frames.shape[2], frames.shape[1], min_side=min_side)


def validate_shard(path: str, *, min_frames: int, min_side: int) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Report of one shard ({samples, bad, ...}) and its bad samples as (key, reason, message)."""
    import webdataset as wds

    errors: list[Exception] = []

    def keep(exn: Exception) -> bool:
        errors.append(exn)
        return True

    bad: Counter[str] = Counter()
    bad_samples: list[tuple[str, str, str]] = []
    samples = 0
    for sample in wds.tarfile_to_samples(handler=keep)(iter([{"url": path}])):
        samples += 1
        try:
            check_sample(sample, min_frames=min_frames, min_side=min_side)
        except DataFormatError as exn:
            bad[exn.reason or "decode_error"] += 1
            bad_samples.append((sample["__key__"], exn.reason or "decode_error", str(exn)))
    if errors:
        bad["corrupt_tar"] += 1
        bad_samples.append(("", "corrupt_tar", str(errors[0].args[0] if errors[0].args else errors[0])))
    report: dict[str, Any] = {"samples": samples, "bad": dict(bad)}
    return report, bad_samples


def run(args: argparse.Namespace) -> int:
    """Validate every shard; print a table or `--json`; 1 if anything is bad, 2 for a bad argument."""
    from tqdm import tqdm

    paths = shard_paths(args.shards, "validate")
    if paths is None:
        return 2
    shards: dict[str, dict[str, Any]] = {}
    totals: Counter[str] = Counter()
    quarantine: list[str] = []
    for path, listed in zip(tqdm(paths, desc="validate", unit="shard", disable=args.json), shard_sizes(paths)):
        report, bad_samples = validate_shard(path, min_frames=args.frames, min_side=args.min_side)
        if listed is not None and listed != report["samples"]:
            report["sizes_json"] = listed
        shards[path] = report
        totals.update(report["bad"])
        quarantine += [f"{path}\t{key}\t{reason}\t{msg}" for key, reason, msg in bad_samples]
    summary = {"samples": sum(r["samples"] for r in shards.values()),
               "bad": {r: totals[r] for r in SKIP_REASONS if totals[r]}, "shards": shards}
    if args.quarantine:
        Path(args.quarantine).write_text("".join(line.replace("\n", " ") + "\n" for line in quarantine))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_table(summary)
    mismatched = any("sizes_json" in r for r in shards.values())
    return 1 if summary["bad"] or mismatched else 0


def _print_table(summary: dict[str, Any]) -> None:
    reasons = [r for r in SKIP_REASONS if r in summary["bad"]]
    width = max([len(os.path.basename(p)) for p in summary["shards"]] + [5])
    print(f"{'shard':<{width}}  {'samples':>8}  " + "  ".join(f"{r:>15}" for r in reasons))
    for path, report in summary["shards"].items():
        note = f"  (sizes.json says {report['sizes_json']})" if "sizes_json" in report else ""
        print(f"{os.path.basename(path):<{width}}  {report['samples']:>8}  "
              + "  ".join(f"{report['bad'].get(r, 0):>15}" for r in reasons) + note)
    print(f"{'total':<{width}}  {summary['samples']:>8}  "
          + "  ".join(f"{summary['bad'][r]:>15}" for r in reasons))
    print("OK: no bad samples" if not reasons else f"BAD: {sum(summary['bad'].values())} bad sample(s)")
