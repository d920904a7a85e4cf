"""Exact resume: after a resume a rank sees exactly the samples (and skips) of an uninterrupted run."""

from __future__ import annotations

import json
import logging

import pytest

from dydit_scale.config import DataConfig
from dydit_scale.data import DataFormatError, build_loader


def _cfg(root, workers: int, **kw) -> DataConfig:
    return DataConfig(shards=str(root), resolution=64, batch_size=3, workers=workers, shuffle_buffer=5, **kw)


def _take(loader, count: int) -> list[tuple[list[str], dict[str, int]]]:
    """`count` batches (keys, skip deltas), crossing epoch boundaries the way a step-based trainer does."""
    out, it = [], iter(loader)
    while len(out) < count:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        out.append((batch["keys"], batch["skipped"]))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_keys(bad_image_shards, workers):
    # the bad shards cover the hard cases: skips, a truncated tar shorter than sizes.json, buckets
    total = 2 * len(build_loader(_cfg(bad_image_shards, workers), seed=7, rank=0, world_size=1)) + 3
    reference = _take(build_loader(_cfg(bad_image_shards, workers), seed=7, rank=0, world_size=1), total)
    assert len({tuple(keys) for keys, _ in reference}) > total // 2  # the order is not trivially periodic
    for stop in (1, 4, 9, total - 2):
        first = build_loader(_cfg(bad_image_shards, workers), seed=7, rank=0, world_size=1)
        head = _take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = build_loader(_cfg(bad_image_shards, workers), seed=7, rank=0, world_size=1)
        resumed.load_state_dict(state)
        assert head + _take(resumed, total - stop) == reference, f"diverged after resuming at batch {stop}"
        assert resumed.skipped == build_loader_totals(reference)


def build_loader_totals(batches) -> dict[str, int]:
    totals: dict[str, int] = {}
    for _, skipped in batches:
        for reason, n in skipped.items():
            totals[reason] = totals.get(reason, 0) + n
    return totals


def test_order_depends_on_seed_and_epoch(clean_image_shards):
    loader = build_loader(_cfg(clean_image_shards, 0), seed=0, rank=0, world_size=1)
    epoch0, epoch1 = [b["keys"] for b in loader], [b["keys"] for b in loader]
    other_seed = [b["keys"] for b in build_loader(_cfg(clean_image_shards, 0), seed=1, rank=0, world_size=1)]
    assert epoch0 != epoch1 and epoch0 != other_seed
    again = [b["keys"] for b in build_loader(_cfg(clean_image_shards, 0), seed=0, rank=0, world_size=1)]
    assert again == epoch0


def test_changed_world_size_is_a_one_line_error_under_exact(clean_image_shards):
    two = [build_loader(_cfg(clean_image_shards, 0), seed=0, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        _take(loader, 1)
    states = [loader.state_dict() for loader in two]
    one = build_loader(_cfg(clean_image_shards, 0), seed=0, rank=0, world_size=1)
    with pytest.raises(DataFormatError) as info:
        one.load_state_dict(states)
    message = str(info.value)
    assert "\n" not in message and "world_size=2 (now 1)" in message and "reshuffle" in message


def test_changed_world_size_reshuffles_with_a_warning(clean_image_shards, caplog):
    two = build_loader(_cfg(clean_image_shards, 0), seed=0, rank=0, world_size=2)
    _take(two, 1)
    one = build_loader(_cfg(clean_image_shards, 0, resume_policy="reshuffle"), seed=0, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        one.load_state_dict([two.state_dict(), two.state_dict()])
    assert "reshuffle" in caplog.text and one.epoch == 1 and one.batch == 0
    assert len(list(one)) == len(one)


def test_state_of_another_rank_is_refused(clean_image_shards):
    rank1 = build_loader(_cfg(clean_image_shards, 0), seed=0, rank=1, world_size=2)
    rank0 = build_loader(_cfg(clean_image_shards, 0), seed=0, rank=0, world_size=2)
    with pytest.raises(DataFormatError, match="rank 1 on rank 0"):
        rank0.load_state_dict(rank1.state_dict())
