"""Two real processes (gloo) × two DataLoader workers: disjoint shards, equal batch counts.

Each rank also runs an all_reduce per batch: with unequal counts that collective would hang, which
the hard timeout turns into a failure naming the rank. The parent compares each rank's keys with a
single-process reference built with the same (rank, world_size), so the order is shown to be a pure
function of (seed, epoch, rank, worker), not of the process group.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from rank_processes import exit_after_success, run_ranks

from dydit_scale.config import DataConfig
from dydit_scale.data import build_loader

TIMEOUT_S = 120


def _cfg(root: str) -> DataConfig:
    return DataConfig(shards=root, resolution=64, batch_size=2, workers=2, shuffle_buffer=4)


def _rank_main(rank: int, world_size: int, root: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    # a spawned rank inherits the "spawn" start method, so its DataLoader workers would re-import
    # torch (seconds each); under torchrun/deepspeed ranks are fresh interpreters that fork workers
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world_size)
    try:
        loader = build_loader(_cfg(root), seed=5)  # rank and world size from the process group
        epochs = []
        for _ in range(2):
            keys = []
            for batch in loader:
                flag = torch.ones(1)
                dist.all_reduce(flag)  # hangs if the other rank has already run out of batches
                keys.append(batch["keys"])
            epochs.append(keys)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"epochs": epochs, "len": len(loader)}))
    finally:
        dist.destroy_process_group()
    exit_after_success()


@pytest.mark.distributed
def test_two_ranks_see_disjoint_shards_and_equal_batch_counts(clean_image_shards, tmp_path):
    run_ranks(_rank_main, (2, str(clean_image_shards), str(tmp_path)), timeout_s=TIMEOUT_S)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["len"] == results[1]["len"]
    for epoch in range(2):
        counts = [len(r["epochs"][epoch]) for r in results]
        assert counts[0] == counts[1] == results[0]["len"], f"epoch {epoch}: batch counts per rank {counts}"
        shards = [{k.split("/")[0] for keys in r["epochs"][epoch] for k in keys} for r in results]
        assert not shards[0] & shards[1], f"epoch {epoch}: both ranks read {shards[0] & shards[1]}"
    for rank, result in enumerate(results):
        reference = build_loader(_cfg(str(clean_image_shards)), seed=5, rank=rank, world_size=2)
        assert result["epochs"] == [[b["keys"] for b in reference] for _ in range(2)], f"rank {rank}"
