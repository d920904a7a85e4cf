"""Every planted bad sample is skipped and counted under its reason; bugs are never swallowed."""

from __future__ import annotations

import logging

import pytest

from dydit_scale.config import DataConfig
from dydit_scale.data import build_loader
from dydit_scale.data import loader as loader_module
from dydit_scale.data.format import SKIP_REASONS

#: bad_image_shards: shard 1 plants one sample per reason (two decode errors), shard 2 is truncated.
PLANTED = {"decode_error": 2, "missing_caption": 1, "too_small": 1, "missing_media": 1, "corrupt_tar": 1}


def _loader(root, workers: int = 0):
    # val order (fixed, unshuffled) and one bucket: the epoch ends inside shard 0 of the second
    # pass, so each planted sample is met exactly once
    cfg = DataConfig(shards=str(root), val_shards=str(root), resolution=32, batch_size=2, workers=workers)
    return build_loader(cfg, seed=0, split="val", rank=0, world_size=1, buckets=False)


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_sample_is_skipped_and_counted(bad_image_shards, workers):
    loader = _loader(bad_image_shards, workers)
    deltas = {reason: 0 for reason in SKIP_REASONS}
    keys = []
    for batch in loader:
        assert set(batch["skipped"]) == set(SKIP_REASONS)
        for reason, n in batch["skipped"].items():
            deltas[reason] += n
        keys += batch["keys"]
    assert {r: n for r, n in deltas.items() if n} == PLANTED
    assert dict(loader.skipped) == deltas  # the loader's running total is the sum of the deltas
    assert not any(k.split("/")[1] in ("decode", "nocaption", "small", "nomedia", "truncated") for k in keys)
    assert "shard-000002.tar/t003" in keys and "shard-000002.tar/t004" not in keys  # cut inside t004


def test_warning_names_the_first_bad_key_of_each_shard(bad_image_shards, caplog):
    with caplog.at_level(logging.WARNING, logger="dydit_scale.data"):
        list(_loader(bad_image_shards))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("shard-000001.tar/decode (decode_error" in w for w in warnings) == 1
    assert not any("nocaption" in w for w in warnings)  # later skips of that shard are only counted
    assert sum("shard-000002.tar" in w and "corrupt_tar" in w for w in warnings) == 1


def test_a_bug_in_a_transform_is_raised_not_counted(bad_image_shards, monkeypatch):
    def broken(sample, **kwargs):
        raise TypeError("a bug, not a bad sample")

    monkeypatch.setattr(loader_module, "transform_image", broken)
    with pytest.raises(TypeError, match="a bug"):
        next(iter(_loader(bad_image_shards)))
