"""Video-text samples → clips of exactly `num_frames` frames, resized and cropped to a bucket.

Frames are decoded with decord from the mp4 bytes (no temporary files). A clip spans
(num_frames - 1) × frame_stride + 1 source frames; a shorter video is `video_too_short` rather than
padded, so every batch is rectangular [B, 3, F, H, W] and Latte's fixed `video_length` always fits.
The clip start is drawn from a generator seeded by (seed, epoch, key): varied across epochs, yet
identical after a resume.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from dydit_scale.data.format import VIDEO_EXTS, DataFormatError, check_size, media_bytes, open_video, read_caption, read_meta
from dydit_scale.data.image_text import Item, cover_size, nearest_bucket, sample_id

__all__ = ["clip_indices", "resize_crop_frames", "transform_video"]


def clip_indices(total_frames: int, *, num_frames: int, frame_stride: int, seed_key: str | None) -> list[int]:
    """Source frame indices of one clip; `seed_key=None` takes the centred clip (validation)."""
    span = (num_frames - 1) * frame_stride + 1
    slack = total_frames - span
    assert slack >= 0, "open_video checks the frame count first"
    start = slack // 2 if seed_key is None else random.Random(f"clip:{seed_key}").randint(0, slack)
    return list(range(start, start + span, frame_stride))


def resize_crop_frames(frames: torch.Tensor, target_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 [F, H, W, 3] → uint8 [3, F, h, w]: antialiased bilinear resize to cover, centre crop."""
    x = frames.permute(0, 3, 1, 2)
    height, width = x.shape[-2:]
    new_w, new_h = cover_size(width, height, target_hw)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    top, left = (new_h - target_hw[0]) // 2, (new_w - target_hw[1]) // 2
    x = x[:, :, top:top + target_hw[0], left:left + target_hw[1]]
    return x.permute(1, 0, 2, 3).contiguous()


def transform_video(
    sample: dict[str, Any], *, buckets: tuple[tuple[int, int], ...], num_frames: int, frame_stride: int,
    min_side: int, seed_key: str | None,
) -> Item:
    """Caption check, decord decode of one clip, resize + crop. Raises DataFormatError(reason) if bad."""
    caption = read_caption(sample)
    span = (num_frames - 1) * frame_stride + 1
    reader = open_video(media_bytes(sample, VIDEO_EXTS), min_frames=span)
    key = sample_id(sample)
    indices = clip_indices(len(reader), num_frames=num_frames, frame_stride=frame_stride,
                           seed_key=None if seed_key is None else f"{seed_key}:{key}")
    import decord

    try:
        frames = torch.from_numpy(reader.get_batch(indices).asnumpy())
    except (decord.DECORDError, RuntimeError, ValueError) as exn:
        raise DataFormatError(f"{key}: frames {indices[0]}..{indices[-1]} undecodable: {exn}",
                              reason="decode_error") from exn
    check_size(frames.shape[2], frames.shape[1], min_side=min_side)
    bucket = nearest_bucket(frames.shape[2], frames.shape[1], buckets)
    clip = resize_crop_frames(frames, bucket)
    return Item(key, caption, read_meta(sample), ("video", num_frames, *bucket), {"video": clip})
