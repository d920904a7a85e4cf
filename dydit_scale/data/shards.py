"""Which shards each (rank, worker) reads, in which order, and for how many batches.

Everything here is a pure function of (seed, epoch, rank, worker) and the shard list, so that every
process can compute every other process's plan and a resumed run can recompute its own:

1. the epoch's shard order is a permutation seeded by (seed, epoch) (open_clip `detshuffle2`);
2. `split_by_node` then `split_by_worker` take every world-th / workers-th shard (the islice rule of
   `webdataset.split_by_node/split_by_worker`, with rank and worker passed in rather than read from
   the environment, because the order must not depend on how a process was started);
3. a worker's plan cycles over its shards in passes (pass q > 0 reshuffled by (seed, epoch, rank,
   worker, q)), so a worker never runs dry;
4. every rank yields exactly `batches_per_epoch` = total samples // (world × batch) batches (from
   sizes.json), split over its workers; ranks with less data repeat, ranks with more stop early.
   Equal counts mean no rank waits forever in a collective (webdataset#225).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from dydit_scale.data.format import DataFormatError, shard_sizes

__all__ = [
    "WorkerPlan", "epoch_order", "split_by_node", "split_by_worker", "batches_per_epoch",
    "worker_quota", "count_samples", "resolve_sizes", "check_enough_shards", "check_enough_samples",
]

log = logging.getLogger(__name__)


def epoch_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices in this epoch's order; identical on every rank."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def split_by_node(items: list[int], rank: int, world_size: int) -> list[int]:
    """Every world_size-th item from `rank` (webdataset's split_by_node rule)."""
    return items[rank::world_size]


def split_by_worker(items: list[int], worker: int, num_workers: int) -> list[int]:
    """Every num_workers-th item from `worker` (webdataset's split_by_worker rule)."""
    return items[worker::num_workers]


def batches_per_epoch(total_samples: int, *, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per epoch: the same number on all ranks, at least one."""
    return max(1, total_samples // (world_size * batch_size))


def worker_quota(num_batches: int, *, worker: int, num_workers: int) -> int:
    """Batches logical worker `worker` yields, so that round-robin over workers gives `num_batches`.

    Lower-numbered workers take the remainder, which keeps the DataLoader's round-robin order exact.
    """
    return num_batches // num_workers + (1 if worker < num_batches % num_workers else 0)


def count_samples(path: str) -> int:
    """Count the samples of one shard by reading it with webdataset (slow; sizes.json avoids it)."""
    import webdataset as wds

    def _ignore(exn: Exception) -> bool:
        return True

    return sum(1 for _ in wds.tarfile_to_samples(handler=_ignore)(iter([{"url": path}])))


def resolve_sizes(paths: list[str]) -> list[int]:
    """Sample count of each shard: sizes.json where listed, else counted (with a warning)."""
    sizes = shard_sizes(paths)
    missing = [p for p, n in zip(paths, sizes) if n is None]
    if missing:
        log.warning("%d shard(s) not in a sizes.json (first %s); counting their samples, which reads "
                    "them once; write sizes.json with `dydit-data stats --write-sizes`", len(missing), missing[0])
    return [n if n is not None else count_samples(p) for p, n in zip(paths, sizes)]


@dataclass(frozen=True)
class WorkerPlan:
    """The shard sequence of one logical worker in one epoch: its shards, cycled in reshuffled passes.

    Position p of the plan is shard `url(p)`; a sample position is (p, index within that shard).
    """

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    seed_key: str
    shuffle: bool = True
    _passes: dict[int, list[int]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.urls:
            raise DataFormatError(f"worker plan {self.seed_key}: no shards")

    def _order(self, q: int) -> list[int]:
        if q not in self._passes:
            order = list(range(len(self.urls)))
            if q > 0 and self.shuffle:
                random.Random(f"pass:{self.seed_key}:{q}").shuffle(order)
            self._passes[q] = order
        return self._passes[q]

    def shard(self, p: int) -> int:
        """Index into `urls` of plan position `p`."""
        q, j = divmod(p, len(self.urls))
        return self._order(q)[j]

    def url(self, p: int) -> str:
        return self.urls[self.shard(p)]

    def expected_size(self, p: int) -> int:
        return self.sizes[self.shard(p)]

    def positions(self, lengths: dict[int, int]) -> Iterator[tuple[int, int]]:
        """Every sample position in order, without reading a tar: sizes.json, corrected by `lengths`.

        `lengths` holds the counts actually read where they differed from sizes.json (truncated or
        corrupt shards), which makes this replay match what the tar stream really produced.
        """
        p = 0
        while True:
            for i in range(lengths.get(p, self.expected_size(p))):
                yield (p, i)
            p += 1


def plan_for(
    urls: list[str], sizes: list[int], *, seed: int, epoch: int, rank: int, world_size: int,
    worker: int, num_workers: int, shuffle: bool,
) -> WorkerPlan:
    """The plan of logical `worker` on `rank`: epoch order → split_by_node → split_by_worker."""
    order = epoch_order(len(urls), seed=seed, epoch=epoch, shuffle=shuffle)
    mine = split_by_worker(split_by_node(order, rank, world_size), worker, num_workers)
    return WorkerPlan(
        urls=tuple(urls[i] for i in mine), sizes=tuple(sizes[i] for i in mine),
        seed_key=f"{seed}:{epoch}:{rank}:{worker}", shuffle=shuffle,
    )


def check_enough_shards(num_shards: int, *, world_size: int, num_workers: int, where: str) -> None:
    """Every (rank, worker) needs at least one shard of its own (open_clip's assertion, as an error)."""
    if num_shards < world_size * num_workers:
        raise DataFormatError(
            f"{where}: {num_shards} shard(s) cannot feed {world_size} rank(s) x {num_workers} worker(s); "
            f"need at least {world_size * num_workers} (repack with a smaller `dydit-data pack "
            "--max-count`, or lower data.workers)"
        )


def check_enough_samples(total: int, *, num_shards: int, world_size: int, batch_size: int, where: str) -> None:
    """One global batch must fit in the data, or every batch would repeat samples."""
    if total < world_size * batch_size:
        raise DataFormatError(
            f"{where}: {num_shards} shard(s) hold {total} sample(s), fewer than one batch of "
            f"data.batch_size {batch_size} x {world_size} rank(s); every batch would repeat samples "
            "(lower data.batch_size or add data)"
        )
