"""Shards written by the tests themselves: clean uneven image shards, planted bad samples."""

from __future__ import annotations

from pathlib import Path

import pytest
from shard_fixtures import good_images, png_bytes, truncate_inside, write_shard


@pytest.fixture(scope="session")
def clean_image_shards(tmp_path_factory) -> Path:
    """Five uneven shards (9, 6, 4, 7, 5 samples): splits give ranks and workers different amounts."""
    root = tmp_path_factory.mktemp("clean_images")
    for s, count in enumerate((9, 6, 4, 7, 5)):
        write_shard(root / f"shard-{s:06d}.tar", good_images(f"s{s}k", count))
    return root


@pytest.fixture(scope="session")
def bad_image_shards(tmp_path_factory) -> Path:
    """shard 0: 12 good; shard 1: one bad sample per reason; shard 2: 4 good then truncated (corrupt_tar)."""
    root = tmp_path_factory.mktemp("bad_images")
    write_shard(root / "shard-000000.tar", good_images("g", 12))
    truncated_png = png_bytes((48, 32))[:60]
    bad = [
        {"__key__": "decode", "png": b"not an image at all", "txt": b"garbage bytes"},
        {"__key__": "nocaption", "png": png_bytes()},
        {"__key__": "small", "png": png_bytes((8, 8)), "txt": b"a tiny image"},
        {"__key__": "nomedia", "txt": b"a caption without an image"},
        {"__key__": "truncated", "png": truncated_png, "txt": b"a truncated png"},
        *good_images("h", 2),
    ]
    write_shard(root / "shard-000001.tar", bad)
    path = write_shard(root / "shard-000002.tar", good_images("t", 6, meta=False))
    truncate_inside(path, "t004.png")
    return root
