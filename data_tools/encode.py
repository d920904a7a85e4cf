"""`dydit-data encode SHARDS... OUT --model FOLDER`: pre-encode shards so training skips VAE and text encoders.

For each input shard, writes `OUT/<same name>` with `{key}.latent.npy` (the VAE posterior *mean*,
unscaled: the training step applies the VAE's shift/scaling factor), `{key}.text.npy` ([L, D], the
last text encoder's hidden states, padded to --max-text-tokens), `{key}.text_mask.npy` ([L] bool),
for FLUX also `{key}.pooled.npy` (CLIP pooled output), plus the caption and metadata. Samples with a
class label (`.cls`, e.g. from `pack --layout imagefolder`) get `{key}.latent.npy` + `{key}.cls` (and
their `.txt`, if any) but no text embeddings, so a pipeline folder without a text encoder (a
diffusers `DiTPipeline`: transformer, vae, scheduler) encodes them; captioned samples with such a
folder are a one-line error. Images are
resized and cropped by the loader's own transform (same aspect-ratio buckets, same resolution), so
latents match what the loader would have encoded; videos take the centred clip. Samples are encoded
in batches of one bucket. A finished shard is renamed from `.partial` and added to sizes.json, and
a rerun skips finished shards: encoding resumes at the first unfinished shard.

The VAE and text encoders (those the folder has) are loaded from the local diffusers pipeline folder
with `from_pretrained(..., local_files_only=True)`; nothing is downloaded. A `classes.json` beside the
input shards is copied to OUT.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dydit_scale.data.format import (
    CAPTION_EXT, CLASS_EXT, LATENT_EXT, POOLED_EXT, TEXT_EMB_EXT, TEXT_MASK_EXT, DataFormatError,
    expand_shard_spec, read_classes, read_sizes, write_classes, write_sizes,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="input shard folders, brace patterns, globs or .tar files")
    parser.add_argument("out", help="output folder for the pre-encoded shards")
    parser.add_argument("--model", required=True, help="local diffusers pipeline folder (model_index.json)")
    parser.add_argument("--kind", choices=("image_text", "video_text"), default="image_text", help="as data.kind")
    parser.add_argument("--resolution", type=int, default=256, help="as data.resolution")
    parser.add_argument("--num-frames", type=int, default=16, help="video: as data.num_frames")
    parser.add_argument("--frame-stride", type=int, default=1, help="video: as data.frame_stride")
    parser.add_argument("--max-text-tokens", type=int, default=64, help="as data.max_text_tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per encoder call")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the stored arrays")
    parser.add_argument("--device", default="cpu", help="torch device of the encoders")


@dataclass
class Encoders:
    """VAE and text encoder(s) of one pipeline; `pooled_*` only for two-encoder pipelines (FLUX).

    `tokenizer`/`text_encoder` are None for a class-conditional pipeline (DiT) that has none.
    """

    vae: Any
    tokenizer: Any = None
    text_encoder: Any = None
    pooled_tokenizer: Any = None
    pooled_encoder: Any = None
    folder: str = ""


def load_encoders(folder: str, device: str) -> Encoders:
    """Load the VAE and the text encoders named in `folder/model_index.json` (local files only)."""
    import diffusers
    import transformers

    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        raise DataFormatError(f"encode --model: {folder!r} has no model_index.json; expected a diffusers pipeline folder")
    index = json.loads(index_path.read_text())

    def load(name: str) -> Any:
        library, cls = index[name]
        module = transformers if library == "transformers" else diffusers
        return getattr(module, cls).from_pretrained(folder, subfolder=name, local_files_only=True)

    def named(name: str) -> bool:
        return isinstance(index.get(name), list) and len(index[name]) == 2 and bool(index[name][1])

    if not named("vae"):
        raise DataFormatError(f"encode --model: {index_path} names no vae; expected a diffusers pipeline folder")
    vae = load("vae").to(device).eval()
    if named("text_encoder_2"):
        return Encoders(vae, load("tokenizer_2"), load("text_encoder_2").to(device).eval(),
                        load("tokenizer"), load("text_encoder").to(device).eval(), folder=folder)
    if named("text_encoder"):
        return Encoders(vae, load("tokenizer"), load("text_encoder").to(device).eval(), folder=folder)
    return Encoders(vae, folder=folder)


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def _encode_media(enc: Encoders, batch: dict[str, Any], device: str) -> Any:
    """VAE posterior means of a batch's pixels [B, C, h, w] or frames [B, C, F, h, w]."""
    media = batch["pixels"] if "pixels" in batch else batch["video"]
    if media.dim() == 5:  # [B, 3, F, H, W] → frames through the image VAE
        b, c, f, h, w = media.shape
        flat = media.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).to(device)
        latents = enc.vae.encode(flat).latent_dist.mean
        return latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)
    return enc.vae.encode(media.to(device)).latent_dist.mean


def _encode_text(enc: Encoders, captions: list[str], *, max_text_tokens: int, device: str,
                 dtype: np.dtype) -> list[dict[str, bytes]]:
    """Text embeddings, mask and (FLUX) pooled output of each caption, as .npy members."""
    if enc.text_encoder is None:
        raise DataFormatError(f"encode --model: {enc.folder} has no text_encoder, but the samples have captions "
                              f"and no .{CLASS_EXT} class label; use a text-to-image pipeline folder")
    tokens = enc.tokenizer(captions, padding="max_length", max_length=max_text_tokens, truncation=True,
                           return_tensors="pt").to(device)
    text = enc.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    pooled = None
    if enc.pooled_encoder is not None:
        length = min(77, enc.pooled_tokenizer.model_max_length)
        ptok = enc.pooled_tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                                    return_tensors="pt").to(device)
        pooled = enc.pooled_encoder(input_ids=ptok.input_ids).pooler_output
    out = []
    for i in range(len(captions)):
        arrays = {TEXT_EMB_EXT: _npy(text[i].float().cpu().numpy().astype(dtype)),
                  TEXT_MASK_EXT: _npy(tokens.attention_mask[i].cpu().numpy().astype(bool))}
        if pooled is not None:
            arrays[POOLED_EXT] = _npy(pooled[i].float().cpu().numpy().astype(dtype))
        out.append(arrays)
    return out


def encode_batch(enc: Encoders, items: list[Any], *, max_text_tokens: int, device: str,
                 dtype: np.dtype) -> list[dict[str, bytes]]:
    """VAE latents (and, for captioned items, text embeddings) of one bucket's items, as .npy members.

    A bucket of class-labelled items (its batch carries `labels`) gets latents only: the class
    index is the conditioning, so no text encoder is needed.
    """
    import torch

    from dydit_scale.data.image_text import collate

    batch = collate(items)
    with torch.no_grad():
        latents = _encode_media(enc, batch, device)
        text = ([{} for _ in items] if "labels" in batch else
                _encode_text(enc, batch["captions"], max_text_tokens=max_text_tokens, device=device, dtype=dtype))
    return [{LATENT_EXT: _npy(latents[i].float().cpu().numpy().astype(dtype)), **text[i]} for i in range(len(items))]


def _collect(errors: list[Exception]):
    """A webdataset handler that keeps a tar-reading error and moves on (counted as corrupt_tar)."""
    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True
    return handler


def _transform(args: argparse.Namespace) -> Any:
    import functools

    from dydit_scale.data.image_text import aspect_buckets, transform_image
    from dydit_scale.data.video_text import transform_video

    buckets = aspect_buckets(args.resolution)
    if args.kind == "video_text":
        return functools.partial(transform_video, buckets=buckets, num_frames=args.num_frames,
                                 frame_stride=args.frame_stride, min_side=args.resolution // 2, seed_key=None)
    return functools.partial(transform_image, buckets=buckets, min_side=args.resolution // 2)


def _encoded_sample(item: Any, members: dict[str, bytes]) -> dict[str, Any]:
    """The output sample: arrays, metadata, the caption, and the class label of a `.cls` sample."""
    sample = {"__key__": item.key.split("/", 1)[1], **members, "json": json.dumps(item.meta).encode()}
    if item.label is None or item.caption:
        sample[CAPTION_EXT] = item.caption.encode()
    if item.label is not None:
        sample[CLASS_EXT] = str(item.label).encode("ascii")
    return sample


def encode_shard(src: str, dst: Path, enc: Encoders, args: argparse.Namespace) -> tuple[int, Counter[str]]:
    """Encode one shard into `dst` (written as .partial, renamed when whole); returns (written, skipped)."""
    import webdataset as wds

    transform, skipped, pending = _transform(args), Counter(), {}
    errors: list[Exception] = []
    dtype = np.float16 if args.dtype == "fp16" else np.float32
    written = 0
    partial = dst.with_name(dst.name + ".partial")
    try:
        with open(partial, "wb") as f, wds.TarWriter(f) as sink:
            def flush(items: list[Any]) -> None:
                nonlocal written
                arrays = encode_batch(enc, items, max_text_tokens=args.max_text_tokens, device=args.device,
                                      dtype=dtype)
                for item, members in zip(items, arrays):
                    sink.write(_encoded_sample(item, members))
                    written += 1

            for sample in wds.tarfile_to_samples(handler=_collect(errors))(iter([{"url": src}])):
                try:
                    item = transform(sample)
                except DataFormatError as exn:
                    skipped[exn.reason or "decode_error"] += 1
                    continue
                group = pending.setdefault(item.bucket, [])
                group.append(item)
                if len(group) == args.batch_size:
                    flush(pending.pop(item.bucket))
            for group in pending.values():
                flush(group)
            f.flush()
            os.fsync(f.fileno())
    except DataFormatError:
        partial.unlink(missing_ok=True)  # e.g. captions without a text encoder: nothing half-written stays
        raise
    os.replace(partial, dst)
    skipped["corrupt_tar"] += bool(errors)
    return written, skipped


def _copy_classes(paths: list[str], out: Path) -> None:
    """Copy the input folders' classes.json to OUT; folders naming their classes differently are an error."""
    found = {folder: read_classes(folder) for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths})}
    named = {folder: classes for folder, classes in found.items() if classes}
    if len({json.dumps(sorted(c.items())) for c in named.values()}) > 1:
        raise DataFormatError(f"encode SHARDS: the classes.json of {', '.join(named)} differ; encode each folder "
                              "into its own OUT")
    if named:
        write_classes(out, next(iter(named.values())))


def run(args: argparse.Namespace) -> int:
    """Encode every input shard not yet in OUT; prints a summary of written and skipped samples."""
    from tqdm import tqdm

    try:
        paths = expand_shard_spec(args.shards, where="encode SHARDS")
        names = [os.path.basename(p) for p in paths]
        if len(set(names)) != len(names):
            raise DataFormatError("encode SHARDS: two input shards share a file name; encode each folder separately")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        done = read_sizes(out)
        todo = [p for p in paths if os.path.basename(p) not in done or not (out / os.path.basename(p)).is_file()]
        _copy_classes(paths, out)
        enc = load_encoders(args.model, args.device) if todo else None
        skipped: Counter[str] = Counter()
        for path in tqdm(todo, desc="encode", unit="shard"):
            written, bad = encode_shard(path, out / os.path.basename(path), enc, args)
            write_sizes(out, {os.path.basename(path): written})
            skipped.update(bad)
    except (DataFormatError, OSError) as exn:
        print(f"dydit-data encode: {exn}", file=sys.stderr)
        return 2
    total = sum(read_sizes(out).values())
    bad = {k: v for k, v in sorted(skipped.items()) if v}
    print(f"encode: {out}: {len(paths)} shard(s) ({len(paths) - len(todo)} already done), {total} sample(s)"
          + (f"; skipped {bad}" if bad else ""))
    return 0
