"""Video clips: decoded frame *values* (solid colours through H.264), frame sampling, bad videos."""

from __future__ import annotations

import pytest
import torch
from shard_fixtures import solid_frames, write_shard

from dydit_scale.config import DataConfig
from dydit_scale.data import build_loader
from dydit_scale.data.synthetic import encode_mp4, write_synthetic_shards
from dydit_scale.data.video_text import clip_indices

COLOURS = [(230, 20, 20), (20, 200, 40), (30, 40, 220), (250, 250, 250),
           (10, 10, 10), (240, 220, 30), (128, 128, 128), (20, 200, 220)]
TOLERANCE = 8 / 127.5  # H.264 yuv420p round trip of a flat colour: a few levels of 255


def test_clip_indices_take_every_stride_th_frame():
    assert clip_indices(8, num_frames=4, frame_stride=2, seed_key=None) == [0, 2, 4, 6]
    assert clip_indices(10, num_frames=3, frame_stride=1, seed_key=None) == [3, 4, 5]
    starts = {clip_indices(40, num_frames=4, frame_stride=2, seed_key=f"s:{k}")[0] for k in range(20)}
    assert len(starts) > 3 and max(starts) <= 40 - 7


def test_decoded_frames_have_the_encoded_colours(tmp_path):
    samples = [{"__key__": f"v{i}", "mp4": encode_mp4(solid_frames(COLOURS[i:] + COLOURS[:i], (64, 64))),
                "txt": f"colour clip {i}".encode()} for i in range(4)]
    write_shard(tmp_path / "shard-000000.tar", samples)
    cfg = DataConfig(kind="video_text", shards=str(tmp_path), val_shards=str(tmp_path), resolution=64,
                     batch_size=2, workers=0, num_frames=4, frame_stride=2)
    batches = list(build_loader(cfg, seed=0, split="val", rank=0, world_size=1))
    assert len(batches) == 2
    for batch in batches:
        assert batch["video"].shape == (2, 3, 4, 64, 64)
        for clip, key in zip(batch["video"], batch["keys"]):
            i = int(key.rsplit("v", 1)[1])
            rolled = COLOURS[i:] + COLOURS[:i]
            for t, frame_index in enumerate((0, 2, 4, 6)):  # centred clip of 7 frames out of 8
                expected = torch.tensor(rolled[frame_index], dtype=torch.float32) / 127.5 - 1
                got = clip[:, t].mean(dim=(1, 2))
                assert torch.allclose(got, expected, atol=TOLERANCE), (key, t, got, expected)
                assert clip[:, t].std(dim=(1, 2)).max() < TOLERANCE  # flat: no wrong frame or crop


@pytest.mark.parametrize("workers", [0, 2])
def test_too_short_and_undecodable_videos_are_counted(tmp_path, workers):
    frames = solid_frames(COLOURS, (64, 64))
    good = [{"__key__": f"g{i}", "mp4": encode_mp4(frames), "txt": b"eight frames"} for i in range(4)]
    bad = [{"__key__": "short", "mp4": encode_mp4(frames[:2]), "txt": b"two frames"},
           {"__key__": "broken", "mp4": b"\x00\x00\x00\x18ftypmp42 not really", "txt": b"garbage"}]
    write_shard(tmp_path / "shard-000000.tar", good[:2] + bad)
    write_shard(tmp_path / "shard-000001.tar", good[2:])
    cfg = DataConfig(kind="video_text", shards=str(tmp_path), val_shards=str(tmp_path), resolution=64,
                     batch_size=2, workers=workers, num_frames=4, frame_stride=2)
    loader = build_loader(cfg, seed=0, split="val", rank=0, world_size=1)
    keys = [k for batch in loader for k in batch["keys"]]
    assert len(keys) == 2 * len(loader) and not any(k.endswith(("short", "broken")) for k in keys)
    assert loader.skipped["video_too_short"] == 1 and loader.skipped["decode_error"] == 1


def test_synthetic_videos_stream_through_workers(tmp_path):
    write_synthetic_shards(tmp_path, "video", 8, per_shard=2, num_frames=8, video_size=(96, 64))
    cfg = DataConfig(kind="video_text", shards=str(tmp_path), resolution=64, batch_size=2, workers=2,
                     num_frames=4, frame_stride=2, shuffle_buffer=2)
    batches = list(build_loader(cfg, seed=0, rank=0, world_size=1))
    assert len(batches) == 4 and all(b["video"].shape[:3] == (2, 3, 4) for b in batches)
    assert all(-1 <= b["video"].min() and b["video"].max() <= 1 for b in batches)
