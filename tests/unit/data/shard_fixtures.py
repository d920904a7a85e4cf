"""Helpers that write test shards (imported by conftest.py and the tests; a unique module name)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from dydit_scale.data.format import write_sizes

#: Shorter side ≥ 16 = resolution 32 // 2; three aspect ratios so the buckets are exercised.
_SIZES = ((48, 32), (32, 48), (40, 40))


def png_bytes(size: tuple[int, int] = (48, 32), colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def write_shard(path: Path, samples: list[dict], *, sizes: bool = True) -> Path:
    """Write `samples` with webdataset's TarWriter and record their count in sizes.json."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    if sizes:
        write_sizes(path.parent, {path.name: len(samples)})
    return path


def good_images(prefix: str, count: int, *, meta: bool = True) -> list[dict]:
    samples = [
        {"__key__": f"{prefix}{i:03d}", "png": png_bytes(_SIZES[i % 3], (10 * i % 256, 80, 160)),
         "txt": f"a red square {prefix}{i}".encode()}
        for i in range(count)
    ]
    if meta:
        for i, sample in enumerate(samples):
            sample["json"] = json.dumps({"i": i}).encode()
    return samples


def truncate_inside(path: Path, member: str) -> None:
    """Cut the tar in the middle of `member`'s data: the shard becomes corrupt from there on."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    with open(path, "r+b") as f:
        f.truncate(info.offset_data + info.size // 2)


def solid_frames(colours: list[tuple[int, int, int]], size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """uint8 [F, H, W, 3]: one solid colour per frame."""
    width, height = size
    return np.stack([np.full((height, width, 3), c, dtype=np.uint8) for c in colours])
