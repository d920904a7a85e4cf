"""Image batches: buckets, pixel values, batch dict; pre-encoded batches."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from shard_fixtures import png_bytes, write_shard

from dydit_scale.config import DataConfig
from dydit_scale.data import build_loader
from dydit_scale.data.image_text import aspect_buckets, nearest_bucket


@pytest.mark.parametrize("resolution", [32, 256, 1024])
def test_buckets_keep_the_pixel_count_and_multiples_of_16(resolution):
    buckets = aspect_buckets(resolution)
    assert (resolution, resolution) in buckets
    assert len(buckets) >= 3 or resolution == 32  # 16-px steps leave no other shape near 32²
    assert {(w, h) for h, w in buckets} == set(buckets)
    for height, width in buckets:
        assert height % 16 == 0 and width % 16 == 0
        assert abs(height * width - resolution**2) <= 0.15 * resolution**2
        assert 0.5 <= height / width <= 2.0


def test_nearest_bucket_keeps_the_orientation():
    buckets = aspect_buckets(256)
    landscape, portrait = nearest_bucket(400, 200, buckets), nearest_bucket(200, 400, buckets)
    assert landscape[1] > landscape[0] and portrait[0] > portrait[1]
    assert nearest_bucket(300, 300, buckets) == (256, 256)


def test_image_batch_has_documented_keys_shapes_and_values(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)] * 2
    samples = [{"__key__": f"k{i}", "png": png_bytes((40, 40), c), "txt": f"caption {i}".encode()}
               for i, c in enumerate(colours)]
    for s in range(2):
        write_shard(tmp_path / f"shard-{s:06d}.tar", samples[4 * s:4 * s + 4])
    cfg = DataConfig(shards=str(tmp_path), resolution=32, batch_size=4, workers=0, shuffle_buffer=0)
    batches = list(build_loader(cfg, seed=0, split="train", rank=0, world_size=1))
    assert len(batches) == 2
    for batch in batches:
        assert set(batch) == {"pixels", "captions", "keys", "meta", "skipped"}
        assert batch["pixels"].shape == (4, 3, 32, 32) and batch["pixels"].dtype == torch.float32
        for pixels, key, caption in zip(batch["pixels"], batch["keys"], batch["captions"]):
            i = int(key.split("/k")[1])
            expected = torch.tensor(colours[i], dtype=torch.float32) / 127.5 - 1  # solid colour survives resize
            assert torch.allclose(pixels.mean(dim=(1, 2)), expected, atol=1e-5)
            assert caption == f"caption {i}" and key.startswith("shard-00000")
        assert sum(batch["skipped"].values()) == 0


def test_every_batch_is_one_bucket_and_bucket_shapes_vary(clean_image_shards):
    cfg = DataConfig(shards=str(clean_image_shards), resolution=64, batch_size=2, workers=0, shuffle_buffer=4)
    shapes = {tuple(b["pixels"].shape[-2:]) for b in build_loader(cfg, seed=0, rank=0, world_size=1)}
    assert {(48, 80), (80, 48), (64, 64)} <= shapes  # 48x32 landscape, 32x48 portrait, 40x40 square
    for height, width in shapes:
        assert math.isclose(height * width, 64 * 64, rel_tol=0.15)


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_pre_encoded_shards_give_latents_and_text_embeddings(tmp_path):
    samples = [{"__key__": f"e{i}", "latent.npy": _npy(np.full((4, 8, 8), i, np.float16)),
                "text.npy": _npy(np.full((6, 32), -i, np.float32)), "text_mask.npy": _npy(np.ones(6, bool)),
                "txt": b"cached"} for i in range(4)]
    write_shard(tmp_path / "shard-000000.tar", samples)
    cfg = DataConfig(shards=str(tmp_path), batch_size=2, workers=0, shuffle_buffer=0)
    batch = next(iter(build_loader(cfg, seed=0, rank=0, world_size=1)))
    assert batch["latents"].shape == (2, 4, 8, 8) and batch["latents"].dtype == torch.float32
    assert batch["text_embeds"].shape == (2, 6, 32) and batch["text_mask"].dtype == torch.bool
    for latents, text, key in zip(batch["latents"], batch["text_embeds"], batch["keys"]):
        i = int(key.rsplit("e", 1)[1])
        assert (latents == i).all() and (text == -i).all()


def test_pickled_arrays_are_refused_as_decode_errors(tmp_path):
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    good = {"latent.npy": _npy(np.zeros((4, 8, 8), np.float32)), "text.npy": _npy(np.zeros((6, 32), np.float32))}
    samples = [{"__key__": "evil", "latent.npy": pickled.getvalue(), "text.npy": good["text.npy"]},
               *({"__key__": f"ok{i}", **good} for i in range(3))]
    write_shard(tmp_path / "shard-000000.tar", samples)
    cfg = DataConfig(shards=str(tmp_path), batch_size=3, workers=0, shuffle_buffer=0)
    batch = next(iter(build_loader(cfg, seed=0, split="train", rank=0, world_size=1)))
    assert batch["skipped"]["decode_error"] == 1 and all("evil" not in k for k in batch["keys"])
