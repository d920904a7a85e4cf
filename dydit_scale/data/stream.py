"""One worker's stream: tar samples → deterministic shuffle → decode → bucket batches, resumable.

The stages are webdataset's (`tarfile_to_samples`, `map(handler=...)`) plus three small generators
that keep a `Cursor`, the whole resume state of a worker:

- `batches`: batches yielded this epoch;
- `picks`: samples the shuffle buffer has emitted. The shuffle is content-independent (it picks an
  index with a seeded `random.Random`), so replaying it over sample *positions* read from sizes.json
  rebuilds the exact buffer without reading a single tar;
- `lengths`: the real sample count of shards that differ from sizes.json (truncated or corrupt), so
  the replay matches what the tar stream actually produced;
- `pending`: positions decoded but still waiting in a not-yet-full bucket (at most buckets × B).

On resume the buffered and pending samples are re-read from their shards (a few, near the current
one), the source restarts at the next position, skipping whole shards, and the rest is identical to
an uninterrupted run, key for key and skip for skip (a test compares the keys after a resume with
those of an uninterrupted run).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds

from dydit_scale.data.format import SKIP_REASONS, DataFormatError
from dydit_scale.data.image_text import Item, collate, sample_id
from dydit_scale.data.shards import WorkerPlan

__all__ = ["Cursor", "SkipCounter", "WorkerStream"]

log = logging.getLogger(__name__)
Position = tuple[int, int]
_MAX_SHARD_WARNINGS = 50


@dataclass
class Cursor:
    """Resume state of one logical worker after its last consumed batch (see module docstring)."""

    batches: int = 0
    picks: int = 0
    lengths: dict[int, int] = field(default_factory=dict)
    pending: list[Position] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "picks": self.picks,
                "lengths": {str(p): n for p, n in sorted(self.lengths.items())},
                "pending": [list(pos) for pos in self.pending]}

    @classmethod
    def from_dict(cls, state: dict[str, Any] | None) -> Cursor:
        if not state:
            return cls()
        return cls(batches=int(state["batches"]), picks=int(state["picks"]),
                   lengths={int(p): int(n) for p, n in state["lengths"].items()},
                   pending=[(int(p), int(i)) for p, i in state["pending"]])


class SkipCounter:
    """The pipeline's exception handler: counts bad samples by reason and warns once per shard.

    Only DataFormatError with a reason (a bad sample) and tar-reading errors are swallowed; any other
    exception is a bug and propagates (rule 8: nothing silent).
    """

    def __init__(self, *, max_consecutive: int):
        self.counts: Counter[str] = Counter()
        self.consecutive = 0
        self.max_consecutive = max_consecutive
        self._warned: set[str] = set()

    def _warn(self, url: str, what: str) -> None:
        if url in self._warned:
            log.debug("skipped %s", what)
            return
        self._warned.add(url)
        if len(self._warned) <= _MAX_SHARD_WARNINGS:
            suffix = "" if len(self._warned) < _MAX_SHARD_WARNINGS else " (further shards: debug log only)"
            log.warning("skipped %s; later skips in this shard are only counted%s", what, suffix)

    def count_corrupt(self, url: str, errors: list[Exception]) -> None:
        """A tar that could not be read to its end counts once as `corrupt_tar`.

        Counted when the shard ends rather than inside the handler, because webdataset reads one
        member ahead: counting at the error would count it twice after a resume at the shard's end.
        """
        self.counts["corrupt_tar"] += 1
        first = errors[0]
        self._warn(url, f"rest of {url} (corrupt_tar: {first.args[0] if first.args else first!r})")

    def handle_sample(self, exn: Exception) -> bool:
        """Handler for the decode `map`: count a bad sample, re-raise anything else."""
        if not isinstance(exn, DataFormatError) or exn.reason is None:
            raise exn
        self.counts[exn.reason] += 1
        self._warn(getattr(exn, "url", "?"), f"{getattr(exn, 'sample_id', '?')} ({exn.reason}: {exn})")
        return True

    def take(self) -> dict[str, int]:
        """Counts since the previous call, every reason present (a delta the consumer can sum)."""
        delta = {reason: self.counts.get(reason, 0) for reason in SKIP_REASONS}
        self.counts.clear()
        return delta


def _pick(buf: list, rng: random.Random) -> Any:
    """Remove and return a random element (webdataset's `pick`: swap with the last, pop)."""
    k = rng.randrange(len(buf))
    item = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return item


def _shuffled(src: Iterable, buf: list, bufsize: int, rng: random.Random, cursor: Cursor) -> Iterator:
    """Buffer shuffle that emits as soon as the buffer is full; it never looks at the items."""
    if bufsize <= 1:
        for item in src:
            cursor.picks += 1
            yield item
        return
    for item in src:
        buf.append(item)
        if len(buf) >= bufsize:
            cursor.picks += 1
            yield _pick(buf, rng)
    while buf:
        cursor.picks += 1
        yield _pick(buf, rng)


def _ignore(exn: Exception) -> bool:
    return True


def _collect(errors: list[Exception]) -> Callable[[Exception], bool]:
    """A webdataset handler that keeps the tar-reading error and carries on with the next shard."""
    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True
    return handler


class WorkerStream:
    """Batches of one logical worker for one epoch, starting from `cursor`."""

    def __init__(
        self, plan: WorkerPlan, *, transform: Callable[[dict[str, Any]], Item], batch_size: int,
        shuffle_buffer: int, quota: int, cursor: Cursor,
    ):
        self.plan = plan
        self.transform = transform
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.quota = quota
        self.cursor = cursor

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cur = Cursor.from_dict(self.cursor.to_dict())
        if cur.batches >= self.quota:
            return
        counter = SkipCounter(max_consecutive=sum(self.plan.sizes) + self.shuffle_buffer + 1)
        rng = random.Random(f"samples:{self.plan.seed_key}")
        buffer, next_pos = self._replay(cur, rng)
        fetched = self._fetch(set(buffer) | set(cur.pending))
        shuffled = _shuffled(self._source(next_pos, cur, counter), [fetched[p] for p in buffer],
                             self.shuffle_buffer, rng, cur)
        decoded = wds.map(self._decoder(counter), handler=counter.handle_sample)(shuffled)
        pending = [(pos, self.transform(fetched[pos])) for pos in cur.pending]
        yield from self._batches(decoded, pending, cur, counter)

    def _replay(self, cur: Cursor, rng: random.Random) -> tuple[list[Position], Position]:
        """Shuffle buffer (positions, in buffer order) and next source position after `cur.picks` picks."""
        last: list[Position] = []

        def positions() -> Iterator[Position]:
            for pos in self.plan.positions(cur.lengths):
                last[:] = [pos]
                yield pos

        buf: list[Position] = []
        replay = Cursor()
        shuffled = _shuffled(positions(), buf, self.shuffle_buffer, rng, replay)
        for _ in range(cur.picks):
            next(shuffled)
        next_pos = (last[0][0], last[0][1] + 1) if last else (0, 0)
        return list(buf), next_pos

    def _fetch(self, wanted: set[Position]) -> dict[Position, dict[str, Any]]:
        """Re-read the raw samples at `wanted` positions (only on resume; nothing is counted)."""
        by_shard: dict[int, set[int]] = {}
        for p, i in wanted:
            by_shard.setdefault(p, set()).add(i)
        out: dict[Position, dict[str, Any]] = {}
        for p, indices in sorted(by_shard.items()):
            url = self.plan.url(p)
            for i, sample in enumerate(wds.tarfile_to_samples(handler=_ignore)(iter([{"url": url}]))):
                if i in indices:
                    sample["__pos__"] = (p, i)
                    out[(p, i)] = sample
                if i >= max(indices):
                    break
        missing = wanted - out.keys()
        if missing:
            p, i = min(missing)
            raise DataFormatError(f"{self.plan.url(p)}: sample #{i} recorded in the data state is gone; "
                                  "the shards changed since the checkpoint (use resume_policy: reshuffle)")
        return out

    def _source(self, start: Position, cur: Cursor, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Raw samples from `start` on, tagged with their position; cycles the plan forever."""
        p, first = start
        empty_run = 0
        while True:
            url, expected, count = self.plan.url(p), self.plan.expected_size(p), 0
            errors: list[Exception] = []
            samples = wds.tarfile_to_samples(handler=_collect(errors))(iter([{"url": url}]))
            for i, sample in enumerate(samples):
                count = i + 1
                if i < first:
                    continue  # islice inside the shard we resume in
                if count > expected:
                    cur.lengths[p] = count
                sample["__pos__"] = (p, i)
                yield sample
            if count != expected:
                cur.lengths[p] = count
            if errors:
                counter.count_corrupt(url, errors)
            empty_run = empty_run + 1 if count == 0 else 0
            if empty_run >= len(self.plan.urls):
                raise DataFormatError(f"no readable sample in any of {len(self.plan.urls)} shard(s) "
                                      f"of worker {self.plan.seed_key}, first {self.plan.urls[0]}")
            p, first = p + 1, 0

    def _decoder(self, counter: SkipCounter) -> Callable[[dict[str, Any]], tuple[Position, Item]]:
        def decode(sample: dict[str, Any]) -> tuple[Position, Item]:
            try:
                item = self.transform(sample)
            except DataFormatError as exn:
                exn.sample_id, exn.url = sample_id(sample), str(sample.get("__url__"))
                counter.consecutive += 1
                if counter.consecutive > counter.max_consecutive:
                    raise DataFormatError(f"{counter.consecutive} bad samples in a row (a whole pass over "
                                          f"the shards of worker {self.plan.seed_key}); last: {exn}") from exn
                raise
            counter.consecutive = 0
            return sample["__pos__"], item
        return decode

    def _batches(
        self, decoded: Iterator[tuple[Position, Item]], pending: list[tuple[Position, Item]],
        cur: Cursor, counter: SkipCounter,
    ) -> Iterator[dict[str, Any]]:
        """Bucket batching: a batch is emitted when one bucket holds `batch_size` items."""
        buckets: dict[tuple, list[tuple[int, Position, Item]]] = {}
        arrivals = 0

        def add(pos: Position, item: Item) -> list[tuple[int, Position, Item]] | None:
            nonlocal arrivals
            group = buckets.setdefault(item.bucket, [])
            group.append((arrivals, pos, item))
            arrivals += 1
            return buckets.pop(item.bucket) if len(group) == self.batch_size else None

        for pos, item in pending:
            assert add(pos, item) is None, "a pending bucket was full at the checkpoint"
        for pos, item in decoded:
            full = add(pos, item)
            if full is None:
                continue
            cur.batches += 1
            cur.pending = [p for _, p, _ in sorted(e for group in buckets.values() for e in group)]
            batch = collate([entry[2] for entry in full])
            batch["skipped"] = counter.take()
            batch["_cursor"] = cur.to_dict()
            yield batch
            if cur.batches >= self.quota:
                return
