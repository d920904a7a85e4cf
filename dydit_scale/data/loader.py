"""`build_loader()`: the streaming loader the trainer iterates, with skip counts and exact resume.

Pipeline, top to bottom: shard list (seed, epoch) → split_by_node →
split_by_worker → tarfile_to_samples → shuffle → decode + transform (handler counts) → bucket
batches. Planning lives in `shards.py`, the per-worker stream in `stream.py`.

Iterating a `ShardLoader` yields the rest of the current epoch, exactly `len(loader)` batches per
epoch on every rank, then moves to the next epoch. Batches are `format.ImageBatch`, `VideoBatch` or
`LatentBatch` dicts; batches of class-conditional (`.cls`) samples also carry `labels`, int64 [B]. DataLoader workers serve batches round-robin; batch b of an epoch comes from
logical worker b % workers. After a resume at batch b, DataLoader worker k plays logical worker
(k + b) % workers, so the round-robin continues where it stopped.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dydit_scale.config import DataConfig
from dydit_scale.data.format import SKIP_REASONS, DataFormatError, expand_shard_spec, sample_kind
from dydit_scale.data.image_text import Item, aspect_buckets, transform_image, transform_latent
from dydit_scale.data.shards import (
    batches_per_epoch, check_enough_samples, check_enough_shards, plan_for, resolve_sizes, worker_quota,
)
from dydit_scale.data.stream import Cursor, WorkerStream
from dydit_scale.data.video_text import transform_video

__all__ = ["ShardLoader", "build_loader", "STATE_FORMAT"]

log = logging.getLogger(__name__)
STATE_FORMAT = 1


def _transform(
    sample: dict[str, Any], *, kind: str, buckets: tuple[tuple[int, int], ...], min_side: int,
    num_frames: int, frame_stride: int, seed_key: str | None,
) -> Item:
    """Dispatch on the sample kind: pre-encoded samples are read as arrays whatever `kind` says."""
    if sample_kind(sample) == "latent":
        return transform_latent(sample)
    if kind == "video_text":
        return transform_video(sample, buckets=buckets, num_frames=num_frames, frame_stride=frame_stride,
                               min_side=min_side, seed_key=seed_key)
    return transform_image(sample, buckets=buckets, min_side=min_side)


class _EpochDataset(IterableDataset):
    """Yields one logical worker's batches for the epoch set by the ShardLoader before each iter()."""

    def __init__(self, urls: list[str], sizes: list[int], *, cfg: DataConfig, seed: int, rank: int,
                 world_size: int, shuffle: bool, min_side: int, buckets: bool):
        super().__init__()
        self.urls, self.sizes, self.cfg = urls, sizes, cfg
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.num_workers = max(1, cfg.workers)
        self.num_batches = batches_per_epoch(sum(sizes), world_size=world_size, batch_size=cfg.batch_size)
        self.buckets = aspect_buckets(cfg.resolution, enabled=buckets)
        self.min_side = min_side
        self.epoch, self.rotation = 0, 0
        self.cursors: dict[int, dict[str, Any]] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.num_workers
        plan = plan_for(self.urls, self.sizes, seed=self.seed, epoch=self.epoch, rank=self.rank,
                        world_size=self.world_size, worker=worker, num_workers=self.num_workers,
                        shuffle=self.shuffle)
        transform = functools.partial(
            _transform, kind=self.cfg.kind, buckets=self.buckets, min_side=self.min_side,
            num_frames=self.cfg.num_frames, frame_stride=self.cfg.frame_stride,
            seed_key=f"{self.seed}:{self.epoch}" if self.shuffle else None,
        )
        stream = WorkerStream(
            plan, transform=transform, batch_size=self.cfg.batch_size,
            shuffle_buffer=self.cfg.shuffle_buffer if self.shuffle else 0,
            quota=worker_quota(self.num_batches, worker=worker, num_workers=self.num_workers),
            cursor=Cursor.from_dict(self.cursors.get(worker)),
        )
        try:
            for batch in stream:
                batch["_worker"] = worker
                yield batch
        except DataFormatError as err:
            if info is None:
                raise
            # Crosses the worker boundary as its one-line message; torch would wrap it in a traceback.
            yield {"_error": str(err)}


class ShardLoader:
    """Equal batch counts on every rank, per-reason skip counts, and key-for-key exact resume.

    `skipped` holds the totals of the deltas this loader has delivered (restored by load_state_dict).
    """

    def __init__(self, dataset: _EpochDataset, *, resume_policy: Literal["exact", "reshuffle"],
                 pin_memory: bool, prefetch_factor: int):
        self._ds = dataset
        self.resume_policy = resume_policy
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.epoch, self.batch = 0, 0
        self._cursors: dict[int, dict[str, Any]] = {}
        self._live: Iterator[dict[str, Any]] | None = None
        self.skipped: Counter[str] = Counter({reason: 0 for reason in SKIP_REASONS})

    def __len__(self) -> int:
        """Batches per epoch, identical on every rank."""
        return self._ds.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch >= len(self):
            self._next_epoch()
        ds = self._ds
        ds.epoch, ds.rotation, ds.cursors = self.epoch, self.batch % ds.num_workers, dict(self._cursors)
        loader = DataLoader(
            ds, batch_size=None, num_workers=self._ds.cfg.workers, pin_memory=self.pin_memory,
            worker_init_fn=functools.partial(_init_worker, trainer_pid=os.getpid()),
            multiprocessing_context=_worker_context(self._ds.cfg.workers),
            prefetch_factor=self.prefetch_factor if self._ds.cfg.workers > 0 else None,
            persistent_workers=False,
        )
        self._live = iter(loader)
        try:
            for batch in self._live:
                if "_error" in batch:
                    raise DataFormatError(batch["_error"])
                self._cursors[int(batch.pop("_worker"))] = batch.pop("_cursor")
                self.batch += 1
                self.skipped.update(batch["skipped"])
                yield batch
        finally:
            self.close()
        self._next_epoch()

    def close(self) -> None:
        """Stop this loader's worker processes now.

        They ignore SIGTERM (see `_init_worker`), so the interpreter's exit-time terminate()
        cannot end them; a failed run must shut them down through the DataLoader itself.
        """
        live, self._live = self._live, None
        shutdown = getattr(live, "_shutdown_workers", None)  # multiprocess iterators only
        if shutdown is not None:
            shutdown()

    def _next_epoch(self) -> None:
        self.epoch, self.batch, self._cursors = self.epoch + 1, 0, {}

    def _layout(self) -> dict[str, Any]:
        ds, cfg = self._ds, self._ds.cfg
        return {"world_size": ds.world_size, "workers": ds.num_workers, "batch_size": cfg.batch_size,
                "seed": ds.seed, "num_shards": len(ds.urls), "num_samples": sum(ds.sizes),
                "shuffle_buffer": cfg.shuffle_buffer, "resolution": cfg.resolution, "kind": cfg.kind,
                "num_frames": cfg.num_frames, "frame_stride": cfg.frame_stride}

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: JSON-serialisable, a few hundred bytes per worker.

        Every rank has its own; gather them (`all_gather_object`) and pass the list back to
        `load_state_dict`, which picks this rank's entry.
        """
        return {"format": STATE_FORMAT, "rank": self._ds.rank, "epoch": self.epoch, "batch": self.batch,
                "layout": self._layout(), "skipped": dict(self.skipped),
                "cursors": {str(w): c for w, c in sorted(self._cursors.items())}}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue exactly where `state` stopped; a changed layout follows `resume_policy`."""
        rank, world = self._ds.rank, self._ds.world_size
        if isinstance(state, list):
            mine = state[rank] if len(state) == world else state[0]
        else:
            mine = state
        if mine.get("format") != STATE_FORMAT:
            raise DataFormatError(f"data state: expected format {STATE_FORMAT}, got {mine.get('format')!r}")
        self.skipped = Counter({reason: 0 for reason in SKIP_REASONS}) + Counter(mine["skipped"])
        changed = {k: (v, mine["layout"].get(k)) for k, v in self._layout().items() if mine["layout"].get(k) != v}
        if isinstance(state, list) and len(state) != world:
            changed.setdefault("world_size", (world, len(state)))
        if not changed:
            if mine["rank"] != rank:
                raise DataFormatError(f"data state: got the state of rank {mine['rank']} on rank {rank}; "
                                      "pass the list of all ranks' states")
            self.epoch, self.batch = int(mine["epoch"]), int(mine["batch"])
            self._cursors = {int(w): c for w, c in mine["cursors"].items()}
            return
        what = ", ".join(f"{k}={old} (now {new})" for k, (new, old) in sorted(changed.items()))
        if self.resume_policy == "exact":
            raise DataFormatError(f"data.resume_policy=exact: the checkpoint's data state was written with {what}; "
                                  "resume with the same settings or set data.resume_policy=reshuffle")
        log.warning("data.resume_policy=reshuffle: data state written with %s; starting epoch %d in a new "
                    "order (the rest of epoch %d is not seen)", what, int(mine["epoch"]) + 1, int(mine["epoch"]))
        self.epoch, self.batch, self._cursors = int(mine["epoch"]) + 1, 0, {}


def _worker_context(workers: int) -> multiprocessing.context.BaseContext | None:
    """Workers start from a small fork server, not from the trainer.

    Forked from the trainer, a worker shares the trainer's pages as they were at that moment; once
    DeepSpeed casts, partitions or frees that memory, each such page becomes the worker's own copy,
    and every worker ends up holding GBs of a model it never uses. The server imports only the data
    stack, so starting a worker from it stays cheap.
    """
    if workers == 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _init_worker(worker_id: int, *, trainer_pid: int) -> None:
    """Workers ignore SIGTERM/SIGUSR1: a launcher that signals the whole process group to make the
    trainer checkpoint must not kill the workers mid-batch (the trainer stops them itself).

    And they exit with the trainer: their parent is the fork server, so the DataLoader's own check
    of the parent process cannot see a trainer killed outright (OOM, SIGKILL).
    """
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(trainer_pid,), name="exit-with-trainer", daemon=True).start()


def _exit_with(pid: int) -> None:
    """End this process once `pid` has exited: a pidfd turns readable then (Linux 5.3+); without
    one, poll for the process once a second."""
    try:
        select.select([os.pidfd_open(pid)], [], [])
    except ProcessLookupError:
        pass
    except (AttributeError, OSError):  # no os.pidfd_open on this platform or kernel
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(1.0)
    os._exit(1)


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): explicit, else the initialised process group, else RANK/WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_loader(
    cfg: DataConfig, *, seed: int, split: Literal["train", "val"] = "train", rank: int | None = None,
    world_size: int | None = None, min_side: int | None = None, buckets: bool = True,
    pin_memory: bool = False, prefetch_factor: int = 2,
) -> ShardLoader:
    """The loader of `cfg.shards` (split="train", shuffled) or `cfg.val_shards` (split="val", fixed order).

    Args:
        min_side: shorter image/video side below which a sample is `too_small` (default resolution // 2).
        buckets: aspect-ratio buckets; False crops everything to resolution × resolution.
    """
    where = "data.shards" if split == "train" else "data.val_shards"
    spec = cfg.shards if split == "train" else cfg.val_shards
    if spec is None:
        raise DataFormatError(f"{where}: not set; the validation loader needs held-out shards")
    rank, world_size = _dist_info(rank, world_size)
    urls = expand_shard_spec(spec, where=where)
    check_enough_shards(len(urls), world_size=world_size, num_workers=max(1, cfg.workers), where=where)
    sizes = resolve_sizes(urls)
    check_enough_samples(sum(sizes), num_shards=len(urls), world_size=world_size, batch_size=cfg.batch_size, where=where)
    dataset = _EpochDataset(
        urls, sizes, cfg=cfg, seed=seed, rank=rank, world_size=world_size,
        shuffle=split == "train", min_side=cfg.resolution // 2 if min_side is None else min_side,
        buckets=buckets,
    )
    return ShardLoader(dataset, resume_policy=cfg.resume_policy, pin_memory=pin_memory,
                       prefetch_factor=prefetch_factor)
