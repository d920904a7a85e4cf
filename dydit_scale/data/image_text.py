"""Image-text, image-class and pre-encoded samples → fixed-size tensors, grouped by bucket.

Aspect-ratio buckets (SDXL/PixArt style) keep about resolution² pixels with sides that are multiples
of 16 (VAE ×8, patch ×2), so a portrait photo is not squashed into a square and every batch is
rectangular: the loader only batches samples of the same bucket. Whether a sample has a class label
(`.cls`) is part of its bucket, so a batch is either all class-conditional (it carries `labels`) or
all captioned, never a mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dydit_scale.data.format import (
    IMAGE_EXTS, LATENT_EXT, POOLED_EXT, TEXT_EMB_EXT, TEXT_MASK_EXT, check_latent_members,
    media_bytes, read_array, read_condition, read_image, read_meta,
)

__all__ = ["Item", "aspect_buckets", "nearest_bucket", "cover_size", "resize_crop", "transform_image",
           "transform_latent", "collate"]

SIDE_STEP = 16


@dataclass
class Item:
    """One decoded sample waiting in its bucket; `data` holds uint8 pixels or float arrays.

    `label` is the `.cls` class index (None for captioned samples); it is part of `bucket`.
    """

    key: str
    caption: str
    meta: dict[str, Any]
    bucket: tuple
    data: dict[str, torch.Tensor]
    label: int | None = None


def aspect_buckets(resolution: int, *, max_ratio: float = 2.0, enabled: bool = True) -> tuple[tuple[int, int], ...]:
    """(height, width) buckets of about resolution² pixels, sides multiples of 16, ratio ≤ max_ratio.

    With `enabled=False` there is one square bucket.
    """
    side = max(SIDE_STEP, round(resolution / SIDE_STEP) * SIDE_STEP)
    if not enabled:
        return ((side, side),)
    area = side * side
    buckets = {(side, side)}
    for height in range(SIDE_STEP, 4 * side + 1, SIDE_STEP):
        width = max(SIDE_STEP, round(area / height / SIDE_STEP) * SIDE_STEP)
        if 1 / max_ratio <= height / width <= max_ratio and abs(height * width - area) <= 0.15 * area:
            buckets.update({(height, width), (width, height)})  # portrait and landscape alike
    return tuple(sorted(buckets))


def nearest_bucket(width: int, height: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket whose log aspect ratio is closest to the image's (ties → the squarer one)."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), abs(b[0] - b[1])))


def cover_size(width: int, height: int, target_hw: tuple[int, int]) -> tuple[int, int]:
    """(width, height) after scaling so that the image covers `target_hw` (before the centre crop)."""
    scale = max(target_hw[0] / height, target_hw[1] / width)
    return max(target_hw[1], math.ceil(width * scale - 1e-6)), max(target_hw[0], math.ceil(height * scale - 1e-6))


def resize_crop(img: Any, target_hw: tuple[int, int]) -> torch.Tensor:
    """Resize a PIL image to cover `target_hw` (bicubic, antialiased), centre-crop; uint8 [3, H, W]."""
    from PIL import Image

    new_w, new_h = cover_size(img.width, img.height, target_hw)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - target_hw[0]) // 2, (new_w - target_hw[1]) // 2
    img = img.crop((left, top, left + target_hw[1], top + target_hw[0]))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def transform_image(
    sample: dict[str, Any], *, buckets: tuple[tuple[int, int], ...], min_side: int
) -> Item:
    """Caption/label check, decode, bucket choice, resize + crop. Raises DataFormatError(reason) if bad."""
    caption, label = read_condition(sample)
    data = media_bytes(sample, IMAGE_EXTS)
    chosen: list[tuple[int, int]] = []

    def draft_to(size: tuple[int, int]) -> tuple[int, int]:
        chosen.append(nearest_bucket(size[0], size[1], buckets))
        return cover_size(size[0], size[1], chosen[-1])

    img = read_image(data, min_side=min_side, draft_to=draft_to)
    bucket = chosen[-1] if chosen else nearest_bucket(img.width, img.height, buckets)
    pixels = resize_crop(img, bucket)
    bucket_key = ("image", label is not None, *bucket)
    return Item(sample_id(sample), caption, read_meta(sample), bucket_key, {"pixels": pixels}, label)


def transform_latent(sample: dict[str, Any]) -> Item:
    """Read the .npy members of a pre-encoded sample; the bucket is the set of array shapes (+ label presence)."""
    check_latent_members(sample)
    caption, label = read_condition(sample, caption_required=False)
    data = {"latents": torch.from_numpy(read_array(sample[LATENT_EXT], what=LATENT_EXT).astype(np.float32))}
    if TEXT_EMB_EXT in sample:
        data["text_embeds"] = torch.from_numpy(read_array(sample[TEXT_EMB_EXT], what=TEXT_EMB_EXT).astype(np.float32))
    if POOLED_EXT in sample:
        data["pooled_embeds"] = torch.from_numpy(read_array(sample[POOLED_EXT], what=POOLED_EXT).astype(np.float32))
    if TEXT_MASK_EXT in sample:
        data["text_mask"] = torch.from_numpy(read_array(sample[TEXT_MASK_EXT], what=TEXT_MASK_EXT).astype(bool))
    bucket = ("latent", label is not None, *((name, tuple(t.shape)) for name, t in sorted(data.items())))
    return Item(sample_id(sample), caption, read_meta(sample), bucket, data, label)


def sample_id(sample: dict[str, Any]) -> str:
    """`{shard file name}/{key}`: unique across shards, readable in logs and key-for-key tests."""
    url = str(sample.get("__url__", ""))
    return f"{url.rsplit('/', 1)[-1]}/{sample['__key__']}"


def collate(items: list[Item]) -> dict[str, Any]:
    """Stack one bucket's items; uint8 pixels/frames become float32 in [-1, 1]; labels become int64 [B]."""
    batch: dict[str, Any] = {}
    for name in items[0].data:
        stacked = torch.stack([item.data[name] for item in items])
        if stacked.dtype == torch.uint8:
            stacked = stacked.float().div_(127.5).sub_(1.0)
        batch[name] = stacked
    labelled = [item.label is not None for item in items]
    if any(labelled):
        if not all(labelled):
            raise ValueError(f"collate: {labelled.count(False)} of {len(items)} items have no class label; "
                             "class and caption samples must be in different buckets")
        batch["labels"] = torch.tensor([item.label for item in items], dtype=torch.long)
    batch["captions"] = [item.caption for item in items]
    batch["keys"] = [item.key for item in items]
    batch["meta"] = [item.meta for item in items]
    return batch
