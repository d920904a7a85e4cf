"""The shard format, defined once for the loader and for `dydit-data`.

A shard is a plain tar written by `webdataset.ShardWriter`. A sample is the group of members that
share a key (`{key}.{ext}`); keys never contain dots because webdataset splits the name at the first
dot. Sample kinds:

- image-text:  `{key}.jpg|png|webp` + `{key}.txt` (+ optional `{key}.json` metadata)
- image-class: `{key}.jpg|png|webp` + `{key}.cls` (ImageNet style: the ASCII class index >= 0, e.g.
  `207`), optional `{key}.txt` (kept as the caption, e.g. the class name) and `{key}.json`
- video-text:  `{key}.mp4` + `{key}.txt` (+ optional `{key}.json`)
- pre-encoded: `{key}.latent.npy` (VAE posterior mean, unscaled) + `{key}.text.npy` ([L, D] text
  embeddings), optional `{key}.pooled.npy` ([D']) and `{key}.text_mask.npy` ([L] bool), optional
  `{key}.txt`; or, class-conditional, `{key}.latent.npy` + `{key}.cls` without text embeddings.
  Arrays are read with `allow_pickle=False`: nothing is ever unpickled.

Each shard folder holds `sizes.json` (`{"shard-000000.tar": n, ...}`, open_clip-compatible) so that
loaders know sample counts without reading the tars; class-conditional folders also hold
`classes.json` (`{"0": "tench", ...}`, the `id2label` of diffusers' `DiTPipeline`). The readers
below are the *acceptance test* of a sample: the loader and `dydit-data validate` call the same
functions, so a shard that validates clean never produces a skip in training.

The loader yields one batch type per sample kind (`ImageBatch`, `VideoBatch`, `LatentBatch`, together
`Batch`); `batch_kind` tells which one a batch is, and the trainer dispatches on it. Batches of
`.cls` samples also carry `labels` (int64 [B]); class and caption samples never share a batch.
"""

from __future__ import annotations

import glob
import io
import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal, NotRequired, TypedDict, Union

import numpy as np

from dydit_scale.io import atomic_write_json

if TYPE_CHECKING:
    import decord
    import torch
    from PIL import Image

__all__ = [
    "IMAGE_EXTS", "VIDEO_EXTS", "CAPTION_EXT", "CLASS_EXT", "META_EXT", "LATENT_EXT", "TEXT_EMB_EXT",
    "POOLED_EXT", "TEXT_MASK_EXT", "SIZES_FILE", "CLASSES_FILE", "SKIP_REASONS", "SkipReason", "DataFormatError",
    "ImageBatch", "VideoBatch", "LatentBatch", "Batch", "BatchKind", "BATCH_MEDIA", "batch_kind",
    "expand_shard_spec", "read_sizes", "write_sizes", "read_classes", "write_classes",
    "shard_sizes", "sample_kind", "media_bytes", "read_caption", "read_class", "read_condition",
    "check_latent_members", "read_meta", "read_image", "open_video",
    "check_size", "read_array", "shard_pattern",
]

IMAGE_EXTS: Final = ("jpg", "png", "webp", "jpeg")
VIDEO_EXTS: Final = ("mp4",)
CAPTION_EXT: Final = "txt"
CLASS_EXT: Final = "cls"
META_EXT: Final = "json"
LATENT_EXT: Final = "latent.npy"
TEXT_EMB_EXT: Final = "text.npy"
POOLED_EXT: Final = "pooled.npy"
TEXT_MASK_EXT: Final = "text_mask.npy"
SIZES_FILE: Final = "sizes.json"
CLASSES_FILE: Final = "classes.json"

SkipReason = Literal[
    "corrupt_tar", "decode_error", "missing_caption", "missing_media", "too_small", "video_too_short"
]
#: Every reason a sample can be skipped for; `batch["skipped"]` and `validate --json` use these keys.
SKIP_REASONS: Final[tuple[str, ...]] = (
    "corrupt_tar", "decode_error", "missing_caption", "missing_media", "too_small", "video_too_short"
)


class DataFormatError(ValueError):
    """Shards or a sample that do not follow the format; `reason` is a skip reason for bad samples."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class ImageBatch(TypedDict):
    """A batch of image-text or image-class samples; every image is resized and cropped to one bucket."""

    pixels: torch.Tensor  # [B, 3, H, W] float32 in [-1, 1]
    labels: NotRequired[torch.Tensor]  # [B] int64 class indices, only in batches of .cls samples
    captions: list[str]  # the .txt of each sample ("" for a .cls sample without one)
    keys: list[str]  # "{shard file name}/{sample key}", unique across shards
    meta: list[dict[str, Any]]  # the optional .json of each sample ({} when absent)
    skipped: dict[str, int]  # skip-count delta since this worker's previous batch, by reason


class VideoBatch(TypedDict):
    """A batch of video-text clips: `num_frames` frames every `frame_stride`, one bucket."""

    video: torch.Tensor  # [B, 3, F, H, W] float32 in [-1, 1]
    captions: list[str]
    keys: list[str]
    meta: list[dict[str, Any]]
    skipped: dict[str, int]


class LatentBatch(TypedDict, total=False):
    """A batch of pre-encoded samples (`dydit-data encode`); the VAE and text encoders are skipped."""

    latents: torch.Tensor  # [B, C, h, w] or [B, C, F, h, w], unscaled posterior mean
    text_embeds: torch.Tensor  # [B, L, D]; absent in class-conditional batches without .text.npy
    pooled_embeds: torch.Tensor  # [B, D'] when the shards have .pooled.npy
    labels: torch.Tensor  # [B] int64 class indices when the shards have .cls (text_embeds then optional)
    text_mask: torch.Tensor  # [B, L] bool when the shards have .text_mask.npy
    captions: list[str]
    keys: list[str]
    meta: list[dict[str, Any]]
    skipped: dict[str, int]


#: A batch as the loader yields it (`image_text.collate` stacks one bucket of one sample kind).
Batch = Union[ImageBatch, VideoBatch, LatentBatch]
BatchKind = Literal["image", "video", "latent"]
#: The member only batches of each kind carry: pixels, frames, or pre-encoded latents.
BATCH_MEDIA: Final[dict[str, str]] = {"image": "pixels", "video": "video", "latent": "latents"}


def batch_kind(batch: Batch | dict[str, Any]) -> BatchKind:
    """Which of the three batch types `batch` is, by the media member it carries (`BATCH_MEDIA`)."""
    found = [kind for kind, member in BATCH_MEDIA.items() if member in batch]
    if len(found) != 1:
        raise DataFormatError(f"a batch carries exactly one of {', '.join(BATCH_MEDIA.values())}; "
                              f"got {', '.join(sorted(k for k in batch if not k.startswith('_'))) or 'none'}")
    return found[0]  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Shard specs and sizes.json


def expand_shard_spec(spec: str | list[str] | tuple[str, ...], *, where: str = "data.shards") -> list[str]:
    """Expand a folder (its *.tar), a brace pattern, a glob, or a list of those into tar paths.

    The order is deterministic: spec order, sorted within a folder or glob, brace order within a
    pattern; duplicates are dropped. Anything that matches no file is a one-line error.
    """
    import braceexpand

    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise DataFormatError(f"{where}: expected a folder, pattern, glob or list of them, got []")
    paths: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(glob.escape(item), "*.tar")))
        elif "{" in item:
            found = list(braceexpand.braceexpand(item))
            missing = [p for p in found if not os.path.isfile(p)]
            if missing:
                raise DataFormatError(
                    f"{where}: {item!r} names {len(missing)} missing file(s), first {missing[0]!r}"
                )
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
        else:
            found = [item] if os.path.isfile(item) else []
        if not found:
            raise DataFormatError(f"{where}: {item!r} matches no shard file (expected a folder of *.tar, "
                                  "a brace pattern, a glob or a .tar path)")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def read_sizes(folder: str | Path) -> dict[str, int]:
    """The sample count of each shard in `folder` from its sizes.json ({} when there is none)."""
    path = Path(folder) / SIZES_FILE
    if not path.is_file():
        return {}
    try:
        sizes = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise DataFormatError(f"{path}: expected JSON {{shard name: sample count}}, got {exn}") from exn
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
        raise DataFormatError(f"{path}: expected {{shard name: sample count >= 0}}, got {sizes!r:.80}")
    return sizes


def write_sizes(folder: str | Path, sizes: dict[str, int]) -> None:
    """Merge `sizes` into `folder`/sizes.json (atomically)."""
    merged = {**read_sizes(folder), **sizes}
    atomic_write_json(Path(folder) / SIZES_FILE, merged)


def write_classes(folder: str | Path, names: list[str] | dict[int, str]) -> None:
    """Write `folder`/classes.json as `{"0": name, ...}` (atomically): the id2label a DiT pipeline takes."""
    by_index = dict(enumerate(names)) if isinstance(names, list) else names
    atomic_write_json(Path(folder) / CLASSES_FILE, {str(i): name for i, name in sorted(by_index.items())})


def read_classes(folder: str | Path) -> dict[int, str]:
    """The class names of `folder`/classes.json by index ({} when there is none)."""
    path = Path(folder) / CLASSES_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError(f"got {raw!r:.80}")
        return {int(k): v for k, v in raw.items()}
    except (json.JSONDecodeError, ValueError) as exn:
        raise DataFormatError(f"{path}: expected JSON {{\"class index\": \"name\"}}, {exn}") from exn


def shard_sizes(paths: list[str]) -> list[int | None]:
    """Sample count of each shard from the sizes.json beside it (None where it is not listed)."""
    cache: dict[str, dict[str, int]] = {}
    out: list[int | None] = []
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in cache:
            cache[folder] = read_sizes(folder)
        out.append(cache[folder].get(os.path.basename(path)))
    return out


def shard_pattern(out_dir: str | Path, prefix: str = "shard") -> str:
    """The `%`-pattern ShardWriter fills with the shard number: `out/shard-000000.tar`."""
    return os.path.join(str(out_dir), f"{prefix}-%06d.tar")


# ---------------------------------------------------------------------------------------------
# Sample readers: raise DataFormatError(reason=...) for a bad sample


def sample_kind(sample: dict[str, Any]) -> Literal["image", "video", "latent"]:
    """Which of the three sample kinds `sample` is, from its member extensions."""
    if LATENT_EXT in sample or TEXT_EMB_EXT in sample:
        return "latent"
    if any(ext in sample for ext in VIDEO_EXTS):
        return "video"
    if any(ext in sample for ext in IMAGE_EXTS):
        return "image"
    raise DataFormatError(
        f"{sample.get('__key__')}: no media member (expected .jpg|.png|.webp, .mp4 or .latent.npy)",
        reason="missing_media",
    )


def media_bytes(sample: dict[str, Any], exts: tuple[str, ...]) -> bytes:
    """The bytes of the first member of `sample` with one of `exts`."""
    for ext in exts:
        if ext in sample:
            return sample[ext]
    raise DataFormatError(f"{sample.get('__key__')}: no .{'|.'.join(exts)} member", reason="missing_media")


def read_caption(sample: dict[str, Any], *, required: bool = True) -> str:
    """The stripped UTF-8 caption; a missing or empty caption is `missing_caption`."""
    raw = sample.get(CAPTION_EXT)
    if raw is None or not raw.strip():
        if required:
            raise DataFormatError(f"{sample.get('__key__')}: no caption (.txt)", reason="missing_caption")
        return ""
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        raise DataFormatError(f"{sample.get('__key__')}: caption is not UTF-8", reason="decode_error") from exn


def read_class(sample: dict[str, Any]) -> int | None:
    """The class index of a `.cls` member (ASCII integer >= 0), None when the sample has none.

    Anything else (a sign, a fraction, a name, non-ASCII bytes) is a `decode_error`: a wrong label
    would silently train the wrong class.
    """
    raw = sample.get(CLASS_EXT)
    if raw is None:
        return None
    text = raw.strip() if isinstance(raw, bytes) else str(raw).encode("utf-8", "replace").strip()
    if not text.isdigit():  # bytes.isdigit: ASCII 0-9 only, so no sign, no fraction, no name
        raise DataFormatError(f"{sample.get('__key__')}: .{CLASS_EXT} must be a class index >= 0 in ASCII, "
                              f"got {text[:20]!r}", reason="decode_error")
    return int(text)


def read_condition(sample: dict[str, Any], *, caption_required: bool = True) -> tuple[str, int | None]:
    """(caption, class index or None): a `.cls` sample needs no caption; its `.txt` is kept if present.

    A sample with neither a caption nor a class label is `missing_caption` when one is required.
    """
    label = read_class(sample)
    if label is not None or not caption_required:
        return read_caption(sample, required=False), label
    if not (sample.get(CAPTION_EXT) or b"").strip():
        raise DataFormatError(f"{sample.get('__key__')}: no caption (.{CAPTION_EXT}) or class label "
                              f"(.{CLASS_EXT})", reason="missing_caption")
    return read_caption(sample), None


def check_latent_members(sample: dict[str, Any]) -> None:
    """A pre-encoded sample needs `.latent.npy`, and `.text.npy` unless it is class-conditional (`.cls`)."""
    if LATENT_EXT not in sample:
        raise DataFormatError(f"{sample.get('__key__')}: pre-encoded sample needs .{LATENT_EXT}",
                              reason="missing_media")
    if TEXT_EMB_EXT not in sample and CLASS_EXT not in sample:
        raise DataFormatError(f"{sample.get('__key__')}: pre-encoded sample needs .{TEXT_EMB_EXT} "
                              f"(or .{CLASS_EXT} for a class-conditional one)", reason="missing_media")


def read_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The optional .json metadata ({} when absent); malformed JSON is a `decode_error`."""
    raw = sample.get(META_EXT)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise DataFormatError(f"{sample.get('__key__')}: bad .json ({exn})", reason="decode_error") from exn
    return meta if isinstance(meta, dict) else {"value": meta}


def read_image(
    data: bytes, *, min_side: int = 0, draft_to: Callable[[tuple[int, int]], tuple[int, int]] | None = None
) -> Image.Image:
    """Fully decode an image to RGB; an image whose shorter side is below `min_side` is `too_small`.

    `draft_to(native (w, h))` names the size the caller will resize to, which lets a JPEG be decoded
    at 1/2, 1/4 or 1/8 scale directly (much faster for large photos; never below that size).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        check_size(img.size[0], img.size[1], min_side=min_side)
        if draft_to is not None:
            wanted = draft_to(img.size)
            if img.format == "JPEG":
                img.draft("RGB", wanted)
        img = img.convert("RGB")
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        if isinstance(exn, DataFormatError):
            raise
        raise DataFormatError(f"undecodable image: {exn}", reason="decode_error") from exn
    return img


def open_video(data: bytes, *, min_frames: int = 1) -> decord.VideoReader:
    """Open an mp4 from bytes with decord and check its frame count (`video_too_short`).

    Nothing is decoded yet (the caller decodes the frames it needs and checks their size with
    `check_size`). decord 0.6 cannot read 16 or 48 px wide videos: `decode_error`.
    """
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        num_frames = len(reader)
    except (decord.DECORDError, RuntimeError, ValueError) as exn:
        raise DataFormatError(f"undecodable video: {exn}", reason="decode_error") from exn
    if num_frames < min_frames:
        raise DataFormatError(f"video has {num_frames} frames, needs {min_frames}", reason="video_too_short")
    return reader


def check_size(width: int, height: int, *, min_side: int) -> None:
    """An image or video whose shorter side is below `min_side` is `too_small`."""
    if min(width, height) < min_side:
        raise DataFormatError(f"{width}x{height} is shorter than {min_side} px", reason="too_small")


def read_array(data: bytes, *, what: str) -> np.ndarray:
    """A .npy member, never unpickled; anything else is a `decode_error`."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exn:
        raise DataFormatError(f"unreadable {what}: {exn}", reason="decode_error") from exn
    if not isinstance(array, np.ndarray) or array.dtype == object:
        raise DataFormatError(f"{what}: expected a numeric array", reason="decode_error")
    return array
