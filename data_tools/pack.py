"""`dydit-data pack SRC OUT`: a folder or a CSV/JSONL manifest of images/videos + captions → shards.

SRC is either a folder (every image/video under it, captions from the `.txt` beside each file and
metadata from an optional `.json`), or a manifest with a `path` and a `caption` column/field (paths
relative to the manifest; other columns go into the sample's `.json`), or an ImageFolder tree
(`--layout imagefolder`, the torchvision layout `SRC/<class name>/**/*.jpg|png|webp`): each image
becomes a class-conditional sample with `.cls`, the index of its class folder in sorted name order
(as `torchvision.datasets.ImageFolder` numbers them), a `.txt` beside it is kept as its caption, and
`OUT/classes.json` maps index → folder name (`{"0": "class_a", ...}`, the id2label of diffusers'
`DiTPipeline`). `--layout auto` picks imagefolder when SRC has no media at its top level but
subfolders holding images. Items without a caption (or class) and images the loader could not
decode are left out, each named on stderr and counted in the summary.
Shards are written by `webdataset.ShardWriter` as `OUT/shard-%06d.tar.partial` and renamed when
complete, so a shard file is always whole. While packing, `pack_progress.json` records, per finished
shard, the next input item: a rerun after an interruption continues from there instead of starting
over or duplicating samples. It is removed once everything is packed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dydit_scale.io import atomic_write_json
from dydit_scale.data.format import (
    CAPTION_EXT, CLASS_EXT, CLASSES_FILE, IMAGE_EXTS, SIZES_FILE, VIDEO_EXTS, DataFormatError, read_image,
    read_sizes, shard_pattern, write_classes, write_sizes,
)

PROGRESS_FILE = "pack_progress.json"


@dataclass(frozen=True)
class Entry:
    """One input item: a media file, its caption (None when missing), extra metadata and class index."""

    path: str
    caption: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    label: int | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a folder of media files with .txt captions, or a .csv/.jsonl manifest")
    parser.add_argument("out", help="output folder for shard-%%06d.tar and sizes.json")
    parser.add_argument("--kind", choices=("auto", "image", "video"), default="auto",
                        help="which media to pack (auto: whatever SRC holds, but not both)")
    parser.add_argument("--layout", choices=("auto", "captions", "imagefolder"), default="auto",
                        help="captions: media with .txt beside them or a manifest; imagefolder: SRC/<class>/*.jpg "
                             "→ class-conditional .cls samples + classes.json (auto: imagefolder when SRC has no "
                             "media at its top level but subfolders holding images)")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-size", type=float, default=1e9, help="bytes per shard at most")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")


def _media_kind(path: str) -> str | None:
    ext = path.rsplit(".", 1)[-1].lower()
    return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None


def _read_caption(path: Path) -> str | None:
    """The caption in the `.txt` beside a media file; None when there is none."""
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exn:
        raise DataFormatError(f"{path}: expected a UTF-8 caption, got undecodable bytes at {exn.start}") from exn


def _read_meta(path: Path) -> dict[str, Any]:
    """The metadata in the optional `.json` beside a media file."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise DataFormatError(f"{path}: expected a JSON object of metadata ({exn})") from exn
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: expected a JSON object of metadata, got {type(meta).__name__}")
    return meta


def _from_folder(src: Path) -> list[Entry]:
    entries = []
    for path in sorted(p for p in src.rglob("*") if p.is_file() and _media_kind(p.name)):
        entries.append(Entry(str(path), _read_caption(path.with_suffix(".txt")), _read_meta(path.with_suffix(".json"))))
    return entries


def resolve_layout(src: str, layout: str) -> str:
    """`captions` or `imagefolder`; auto picks imagefolder for a folder of class subfolders of images
    most of which have no caption (a captioned dataset kept in subfolders stays a captions layout)."""
    if layout != "auto":
        return layout
    path = Path(src)
    if not path.is_dir() or any(p.is_file() and _media_kind(p.name) for p in path.iterdir()):
        return "captions"
    images = [p for p in path.rglob("*") if p.is_file() and _media_kind(p.name) == "image"]
    captioned = sum(p.with_suffix(".txt").is_file() for p in images)
    return "imagefolder" if images and 2 * captioned < len(images) else "captions"


def imagefolder_classes(src: Path) -> list[str]:
    """Class names in index order: every subfolder of SRC, sorted by name (torchvision's ImageFolder)."""
    if not src.is_dir():
        raise DataFormatError(f"{src}: --layout imagefolder expects a folder of class subfolders")
    classes = sorted(entry.name for entry in os.scandir(src) if entry.is_dir())
    if not classes:
        raise DataFormatError(f"{src}: --layout imagefolder expects class subfolders (SRC/<class>/*.jpg), found none")
    return classes


def _from_imagefolder(src: Path) -> list[Entry]:
    """One entry per image under SRC/<class>/, labelled with the class index; a `.txt` beside it is its caption."""
    entries = []
    for label, name in enumerate(imagefolder_classes(src)):
        files = sorted(p for p in (src / name).rglob("*") if p.is_file() and _media_kind(p.name))
        videos = [p for p in files if _media_kind(p.name) != "image"]
        if videos:
            raise DataFormatError(f"{videos[0]}: --layout imagefolder packs images only (.{'|.'.join(IMAGE_EXTS)})")
        if not files:
            raise DataFormatError(f"{src / name}: class folder holds no .{'|.'.join(IMAGE_EXTS)} image; remove it "
                                  "or add images (class indices follow the sorted folder names)")
        for path in files:
            meta = {**_read_meta(path.with_suffix(".json")), "class_name": name}
            entries.append(Entry(str(path), _read_caption(path.with_suffix(".txt")), meta, label))
    return entries


def _manifest_line(src: Path, n: int, line: str) -> dict[str, Any]:
    """One JSONL manifest row as a dict."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exn:
        raise DataFormatError(f"{src}: line {n}: expected a JSON object ({exn})") from exn
    if not isinstance(row, dict):
        raise DataFormatError(f"{src}: line {n}: expected a JSON object, got {type(row).__name__}")
    return row


def _from_manifest(src: Path) -> list[Entry]:
    if src.suffix == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [_manifest_line(src, n, line) for n, line in
                enumerate(src.read_text(encoding="utf-8").splitlines(), start=1) if line.strip()]
    entries = []
    for n, row in enumerate(rows, start=1):
        if "path" not in row:
            got = ", ".join(sorted(row)) or "none"
            raise DataFormatError(f"{src}: row {n}: expected a 'path' column/field, got {got}")
        path = row.pop("path")
        caption = row.pop("caption", None)
        entries.append(Entry(str(src.parent / path), caption.strip() if caption else None, row))
    return entries


def list_entries(src: str, kind: str, layout: str = "captions") -> list[Entry]:
    """The input items in a deterministic order (sorted folder walk, class by class, or manifest order)."""
    path = Path(src)
    if layout == "imagefolder":
        if kind == "video":
            raise DataFormatError(f"{src}: --layout imagefolder packs images; --kind video does not apply")
        return _from_imagefolder(path)
    if path.is_dir():
        entries = _from_folder(path)
    elif path.suffix in (".csv", ".jsonl") and path.is_file():
        entries = _from_manifest(path)
    else:
        raise DataFormatError(f"{src}: expected a folder or a .csv/.jsonl manifest")
    kinds = {_media_kind(e.path) for e in entries}
    if kind == "auto" and len(kinds) > 1:
        raise DataFormatError(f"{src} holds both images and videos; pass --kind image or --kind video")
    if kind != "auto":
        entries = [e for e in entries if _media_kind(e.path) == kind]
    unknown = [e.path for e in entries if _media_kind(e.path) is None]
    if unknown:
        raise DataFormatError(f"{unknown[0]}: expected .{'|.'.join(IMAGE_EXTS + VIDEO_EXTS)}")
    return entries


def _fingerprint(entries: list[Entry], args: argparse.Namespace) -> str:
    digest = hashlib.sha1(f"{args.max_count}:{args.max_size}:{args.prefix}".encode())
    for entry in entries:
        label = "" if entry.label is None else f"\0{entry.label}"
        digest.update(f"{entry.path}\0{entry.caption}{label}\n".encode())
    return digest.hexdigest()


def _load_progress(out: Path, fingerprint: str) -> dict[str, Any]:
    path = out / PROGRESS_FILE
    if path.is_file():
        progress = json.loads(path.read_text())
        if progress.get("fingerprint") != fingerprint:
            raise DataFormatError(f"{out} holds shards packed from other input or options; "
                                  "pack into an empty folder (or delete it)")
        return progress
    if any(out.glob("*.tar")) or (out / SIZES_FILE).is_file():
        raise DataFormatError(f"{out} already holds shards (a finished pack or other shards); "
                              "pack into an empty folder")
    return {"fingerprint": fingerprint, "shards": {}}


def _read_media(entry: Entry) -> bytes:
    """The media file's bytes; an unreadable file is an error naming it."""
    try:
        return Path(entry.path).read_bytes()
    except OSError as exn:
        raise DataFormatError(f"{entry.path}: cannot read it ({exn.strerror or exn})") from exn


def _image_problem(data: bytes) -> str | None:
    """Why the training loader could not decode this image (the same decoder), or None when it can."""
    from PIL import UnidentifiedImageError

    try:
        read_image(data)
    except DataFormatError as exn:
        if isinstance(exn.__cause__, UnidentifiedImageError):
            return "not an image format PIL can read"
        return str(exn.__cause__ or exn)
    return None


def _sample(index: int, entry: Entry, data: bytes) -> dict[str, Any]:
    ext = entry.path.rsplit(".", 1)[-1].lower()
    sample: dict[str, Any] = {"__key__": f"{index:09d}", {"jpeg": "jpg"}.get(ext, ext): data}
    if entry.caption:
        sample[CAPTION_EXT] = entry.caption.encode("utf-8")
    if entry.label is not None:
        sample[CLASS_EXT] = str(entry.label).encode("ascii")
    sample["json"] = json.dumps({"source": entry.path, **entry.meta}).encode("utf-8")
    return sample


def _media_or_reason(entry: Entry) -> tuple[bytes | None, str, str]:
    """(the bytes to pack, "", "") or (None, summary group, reason) for an item left out."""
    if not entry.caption and entry.label is None:
        return None, "without a caption", "no caption (a .txt beside it, or a 'caption' field)"
    data = _read_media(entry)
    problem = _image_problem(data) if _media_kind(entry.path) == "image" else None
    return (None, "with an undecodable image", f"undecodable image: {problem}") if problem else (data, "", "")


def run(args: argparse.Namespace) -> int:
    """Pack SRC into OUT; a bad input is one line on stderr and exit code 2."""
    try:
        return _pack(args)
    except (DataFormatError, OSError) as exn:
        print(f"dydit-data pack: {exn}", file=sys.stderr)
        return 2


def _pack(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    import webdataset as wds

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layout = resolve_layout(args.src, getattr(args, "layout", "auto"))
    entries = list_entries(args.src, args.kind, layout)
    progress = _load_progress(out, _fingerprint(entries, args))
    classes = imagefolder_classes(Path(args.src)) if layout == "imagefolder" else []
    if classes:
        write_classes(out, classes)
    done = progress["shards"]
    start_item = max((s["next_item"] for s in done.values()), default=0)
    for stale in out.glob("*.partial"):
        stale.unlink()
    state = {"next_item": start_item, "samples": 0, "files": {}}

    def opener(fname: str):
        state["files"][fname] = open(fname + ".partial", "wb")
        return state["files"][fname]

    def finished(fname: str) -> None:
        f = state["files"].pop(fname)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        if state.get("interrupted"):
            return  # leave the .partial: the next run deletes it and packs those items again
        os.replace(fname + ".partial", fname)
        name = os.path.basename(fname)
        done[name] = {"samples": state["samples"], "next_item": state["next_item"]}
        write_sizes(out, {name: state["samples"]})
        atomic_write_json(out / PROGRESS_FILE, progress)
        state["samples"] = 0

    left_out: Counter[str] = Counter()
    todo = entries[start_item:]
    if todo:
        writer = wds.ShardWriter(shard_pattern(out, args.prefix), maxcount=args.max_count, maxsize=args.max_size,
                                 start_shard=len(done), verbose=0, opener=opener, post=finished)
        with writer, tqdm(total=len(entries), initial=start_item, unit="sample", desc="pack") as bar:
            try:
                for index, entry in enumerate(todo, start=start_item):
                    data, group, reason = _media_or_reason(entry)
                    if data is None:
                        bar.write(f"dydit-data pack: {entry.path}: {reason}; left out", file=sys.stderr)
                        left_out[group] += 1
                    else:
                        writer.write(_sample(index, entry, data))
                        state["samples"] += 1
                    state["next_item"] = index + 1
                    bar.update(1)
            except BaseException:
                state["interrupted"] = True
                raise
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    total = sum(read_sizes(out).values())
    print(f"pack: {out}: {len(done)} shard(s), {total} sample(s)"
          + (f"; {len(classes)} class(es) in {CLASSES_FILE}" if classes else "")
          + (f"; resumed at item {start_item}" if start_item else "")
          + "".join(f"; {n} item(s) {why} left out" for why, n in left_out.items()))
    return 0
