"""`dydit-bench data`: samples/s of our loader vs a bare webdataset pipeline on the same shards.

Both sides do the same per-sample work (decode with PIL or decord, resize + centre crop to the
resolution, float conversion, batching) with the same DataLoader worker count, so the ratio
measures what our machinery costs: positions, deterministic shuffle, bucketing, skip counting,
cursors. The goal is ratio ≥ 0.95. Runs alternate (ours, bare, ours, bare, ...) and the best of
`--repeats` is kept, which damps the noise of a shared machine. Without --image-shards or
--video-shards, synthetic shards are written to a temporary folder first.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from typing import Any

import torch

from dydit_scale.bench.goals import Goal, goal_checks
from dydit_scale.config import DataConfig
from dydit_scale.data import build_loader
from dydit_scale.data.format import expand_shard_spec
from dydit_scale.data.image_text import resize_crop
from dydit_scale.data.synthetic import write_synthetic_shards
from dydit_scale.data.video_text import clip_indices, resize_crop_frames

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--image-shards", help="image-text shards; unset = synthetic, written to a temp dir")
    parser.add_argument("--video-shards", help="video-text shards; unset = synthetic, written to a temp dir")
    parser.add_argument("--kinds", default="image,video", help="comma-separated: image, video")
    parser.add_argument("--count", type=int, default=512, help="synthetic images (videos: count // 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--resolution", type=int, default=128, help="target image side in pixels")
    parser.add_argument("--num-frames", type=int, default=8, help="video: frames per clip")
    parser.add_argument("--shuffle-buffer", type=int, default=100, help="sample shuffle buffer per worker")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per loader; the best counts")


def _bare_image(sample: dict[str, Any], *, resolution: int) -> tuple[torch.Tensor, str]:
    pixels = resize_crop(sample["jpg"] if "jpg" in sample else sample["png"], (resolution, resolution))
    return pixels.float().div_(127.5).sub_(1.0), sample["txt"]


def _bare_video(sample: dict[str, Any], *, resolution: int, num_frames: int) -> tuple[torch.Tensor, str]:
    import io

    import decord

    reader = decord.VideoReader(io.BytesIO(sample["mp4"]), num_threads=1)
    indices = clip_indices(len(reader), num_frames=num_frames, frame_stride=1, seed_key=None)
    frames = torch.from_numpy(reader.get_batch(indices).asnumpy())
    clip = resize_crop_frames(frames, (resolution, resolution))
    return clip.float().div_(127.5).sub_(1.0), sample["txt"].decode()


def _text(key: str, data: bytes) -> str | None:
    """The `.txt` member as a string (a decoder handler; None = not mine)."""
    return data.decode("utf-8") if key == ".txt" else None


def _bare_loader(urls: list[str], kind: str, args: argparse.Namespace) -> torch.utils.data.DataLoader:
    """What a user would write with webdataset alone (split_by_node/worker, shuffle, decode, batch),
    doing the same per-sample work."""
    import webdataset as wds

    if kind == "image":
        # Images and text only: webdataset's default post-handlers would also unpickle .pyd/.pickle members.
        decode = wds.decode(wds.imagehandler("pilrgb"), _text, pre=[], post=[], only=["jpg", "png", "txt"])
        stages = [decode, wds.map(functools.partial(_bare_image, resolution=args.resolution))]
    else:
        stages = [wds.map(functools.partial(_bare_video, resolution=args.resolution, num_frames=args.num_frames))]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples(),
        wds.shuffle(args.shuffle_buffer), *stages, wds.batched(args.batch_size),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=args.workers)


def _ours(urls: list[str], kind: str, args: argparse.Namespace) -> Any:
    cfg = DataConfig(kind="image_text" if kind == "image" else "video_text", shards=urls, resolution=args.resolution,
                     batch_size=args.batch_size, workers=args.workers, shuffle_buffer=args.shuffle_buffer,
                     num_frames=args.num_frames)
    return build_loader(cfg, seed=0, rank=0, world_size=1, buckets=False)


def _time(loader: Any) -> tuple[int, float]:
    """(samples, seconds) of one epoch, worker start-up included (both loaders pay it)."""
    start, samples = time.perf_counter(), 0
    for batch in loader:
        first = batch[0] if isinstance(batch, (list, tuple)) else next(
            v for k, v in batch.items() if k in ("pixels", "video"))
        samples += first.shape[0]
    return samples, time.perf_counter() - start


def _shards(kind: str, given: str | None, tmp: str, args: argparse.Namespace) -> list[str]:
    if given:
        return expand_shard_spec(given, where=f"--{kind}-shards")
    count = args.count if kind == "image" else max(8, args.count // 2)
    per_shard = max(1, count // (4 * max(1, args.workers)))
    return write_synthetic_shards(f"{tmp}/{kind}", kind, count, per_shard=per_shard,
                                  num_frames=max(8, args.num_frames), video_size=(160, 128))


def measure(kind: str, urls: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Best samples/s of each loader over alternating repeats, and their ratio."""
    best = {"ours": 0.0, "webdataset": 0.0}
    for _ in range(args.repeats):
        for name, make in (("ours", _ours), ("webdataset", _bare_loader)):
            samples, seconds = _time(make(urls, kind, args))
            best[name] = max(best[name], samples / seconds)
    ratio = round(best["ours"] / best["webdataset"], 3)
    return {"ours_samples_per_s": round(best["ours"], 1), "webdataset_samples_per_s": round(best["webdataset"], 1),
            "ratio": ratio, "goal_checks": goal_checks({"ratio": ratio_goal(ratio)})}


def ratio_goal(ratio: float) -> Goal:
    """Our loader keeps at least 95 % of bare webdataset's throughput."""
    return Goal(ratio, ">=", 0.95)


def run(args: argparse.Namespace) -> int:
    """Measure each kind; print a table or JSON."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dydit-bench-data-") as tmp:
        for kind in kinds:
            urls = _shards(kind, getattr(args, f"{kind}_shards"), tmp, args)
            results[kind] = measure(kind, urls, args)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'data':<8} {'ours (samples/s)':>18} {'webdataset (samples/s)':>24} {'ratio':>7}  goal")
    for kind, r in results.items():
        print(f"{kind:<8} {r['ours_samples_per_s']:>18.1f} {r['webdataset_samples_per_s']:>24.1f} {r['ratio']:>7.3f}"
              f"  {ratio_goal(r['ratio']).mark()}")
    print(f"(batch {args.batch_size}, {args.workers} workers, {args.resolution} px, best of {args.repeats})")
    return 0
