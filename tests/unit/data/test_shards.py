"""Shard-spec forms, the node/worker split and the equal-batch arithmetic."""

from __future__ import annotations

import logging
import os

import pytest

from dydit_scale.data.format import DataFormatError, expand_shard_spec
from dydit_scale.data.shards import (
    batches_per_epoch, epoch_order, plan_for, resolve_sizes, split_by_node, split_by_worker, worker_quota,
)


def _names(paths: list[str]) -> list[str]:
    return [os.path.basename(p) for p in paths]


def test_every_shard_spec_form_expands_in_a_deterministic_order(clean_image_shards):
    root = str(clean_image_shards)
    every = [f"shard-{i:06d}.tar" for i in range(5)]
    assert _names(expand_shard_spec(root)) == every
    assert _names(expand_shard_spec(f"{root}/shard-{{000000..000004}}.tar")) == every
    assert _names(expand_shard_spec(f"{root}/shard-00000[0-2].tar")) == every[:3]
    assert _names(expand_shard_spec(f"{root}/*.tar")) == every
    assert _names(expand_shard_spec([f"{root}/shard-000003.tar", root])) == [every[3], *every[:3], every[4]]


@pytest.mark.parametrize("spec", ["nowhere", "nowhere/*.tar", "nowhere/shard-{0..3}.tar", []])
def test_spec_matching_no_file_is_a_one_line_error(tmp_path, spec):
    spec = spec if isinstance(spec, list) else str(tmp_path / spec)
    with pytest.raises(DataFormatError) as info:
        expand_shard_spec(spec, where="data.shards")
    assert str(info.value).startswith("data.shards: ") and "\n" not in str(info.value)


def test_node_and_worker_splits_are_disjoint_and_cover_all_shards():
    order = epoch_order(11, seed=3, epoch=2, shuffle=True)
    assert sorted(order) == list(range(11)) and order != list(range(11))
    parts = [split_by_worker(split_by_node(order, r, 2), w, 3) for r in range(2) for w in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(11))
    assert order == epoch_order(11, seed=3, epoch=2, shuffle=True)
    assert order != epoch_order(11, seed=3, epoch=3, shuffle=True)


def test_worker_quotas_sum_to_the_same_batch_count_on_every_rank():
    num_batches = batches_per_epoch(31, world_size=2, batch_size=4)
    assert num_batches == 3
    assert sum(worker_quota(num_batches, worker=w, num_workers=2) for w in range(2)) == num_batches
    assert batches_per_epoch(1, world_size=8, batch_size=4) == 1


def test_plan_cycles_the_worker_shards_in_reshuffled_passes(clean_image_shards):
    urls = expand_shard_spec(str(clean_image_shards))
    plan = plan_for(urls, resolve_sizes(urls), seed=0, epoch=0, rank=0, world_size=1, worker=0,
                    num_workers=1, shuffle=True)
    first, second = [plan.url(p) for p in range(5)], [plan.url(p) for p in range(5, 10)]
    assert sorted(first) == sorted(second) == sorted(urls)
    positions = plan.positions({})
    assert [next(positions) for _ in range(plan.expected_size(0) + 1)][-1] == (1, 0)


def test_missing_sizes_json_is_counted_with_a_warning(clean_image_shards, tmp_path, caplog):
    src = clean_image_shards / "shard-000001.tar"
    (tmp_path / "x.tar").write_bytes(src.read_bytes())
    with caplog.at_level(logging.WARNING):
        assert resolve_sizes([str(tmp_path / "x.tar")]) == [6]
    assert "sizes.json" in caplog.text


def test_a_batch_larger_than_the_data_is_refused_with_the_numbers(clean_image_shards):
    from dydit_scale.config import DataConfig
    from dydit_scale.data import build_loader

    cfg = DataConfig(shards=str(clean_image_shards), resolution=32, batch_size=16, workers=0, shuffle_buffer=0)
    build_loader(cfg, seed=0, rank=0, world_size=1)  # 31 samples: one batch of 16 fits
    with pytest.raises(DataFormatError, match=r"5 shard\(s\) hold 31 sample\(s\), fewer than one batch of "
                                              r"data.batch_size 16 x 2 rank\(s\)"):
        build_loader(cfg, seed=0, rank=0, world_size=2)
