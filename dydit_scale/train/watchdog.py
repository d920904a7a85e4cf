"""Rank-failure watchdog: a heartbeat per rank through the rendezvous TCPStore.

Why: a rank killed on the same host resets its gloo sockets and the survivors fail at once, but with
an anonymous "Connection reset by peer" traceback; a frozen rank, a lost node or a cut network leaves
them blocked in a collective until the process-group timeout (30 min). Here every rank bumps its
counter `hb/<rank>` in the store every `interval_s` from a daemon thread and watches everyone
else's; when a counter stands still for `timeout_s` (or the store itself is gone), this rank prints
one line naming the dead rank and leaves with exit code `EXIT_CODE`, from the thread, so a main
thread stuck inside gloo cannot keep it. Clock skew does not matter: only local monotonic time is
compared. A rank that fails on its own (bad data, a full disk) posts its one-line cause under
`failed`, and every other rank leaves within one interval naming it, with that rank's exit code 2
instead of waiting for a timeout. Knobs (env): DYDIT_HEARTBEAT_TIMEOUT seconds (default 30; 0 turns the watchdog off),
DYDIT_HEARTBEAT_INTERVAL seconds (default 2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch

log = logging.getLogger(__name__)
EXIT_CODE = 75  # EX_TEMPFAIL: a peer failed; relaunching (checkpoint.resume=auto) is the remedy
PEER_FAILED_EXIT_CODE = 2  # a peer reported its own error: relaunching would only repeat it
_COMM_ERROR_WORDS = ("gloo", "nccl", "connection", "timed out", "broken pipe", "socket")


def is_comm_error(err: BaseException) -> bool:
    """Does `err` look like a failed collective (rather than a bug on this rank)?"""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and any(word in str(err).lower() for word in _COMM_ERROR_WORDS)


class Watchdog:
    """Heartbeat of this rank + liveness of all others; `stop()` before the final barrier."""

    def __init__(self, rank: int, world_size: int, *, host: str, port: int, timeout_s: float = 30.0,
                 interval_s: float = 2.0, prefix: str = "dydit/watchdog",
                 on_dead: Callable[[str, int], None] | None = None):
        self.rank, self.world_size = rank, world_size
        self.host, self.port = host, port
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.prefix = prefix
        self.on_dead = on_dead or _exit_with
        self.verdict: str | None = None
        self._reported = False
        self._stopped = threading.Event()
        self._decided = threading.Event()
        self._parent = os.getppid()
        self._store = None
        self._thread = threading.Thread(target=self._run, name="dydit-watchdog", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Watchdog:
        store = torch.distributed.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                                           timeout=timedelta(seconds=max(5.0, self.interval_s * 3)))
        self._store = torch.distributed.PrefixStore(self.prefix, store)
        self._store.set(f"host/{self.rank}", socket.gethostname())
        self._store.add(f"hb/{self.rank}", 1)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Mark this rank as finished (peers stop watching it) and end the thread."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            self._store.add(f"done/{self.rank}", 1)
        except Exception:  # noqa: BLE001 - the store may be gone at shutdown; nothing to report then
            pass
        self._thread.join(timeout=self.interval_s * 2)

    def report_failure(self, message: str) -> None:
        """Tell every other rank why this one is about to exit, so that they exit too, at once."""
        self._reported = True
        with contextlib.suppress(Exception):  # a store that is gone cannot carry the news
            self._store.compare_set("failed", "", f"rank {self.rank}: {message}")

    def explain(self, err: BaseException) -> None:
        """After a collective failed on this rank: wait (up to the timeout) for the heartbeat verdict
        so that the exit names the dead rank; returns if no peer turns out dead."""
        if not is_comm_error(err) or self._stopped.is_set():
            return
        log.warning("a collective failed (%s); checking which rank stopped", str(err).splitlines()[0][:200])
        self._decided.wait(self.timeout_s + 3 * self.interval_s)

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        last_seen = {r: (0, time.monotonic()) for r in range(self.world_size) if r != self.rank}
        failures_since: float | None = None
        while not self._stopped.wait(self.interval_s):
            if os.getppid() != self._parent:
                self._dead(f"rank {self.rank}: its launcher (pid {self._parent}) exited; stopping this rank")
                return
            try:
                self._store.add(f"hb/{self.rank}", 1)
                if not self._reported and self._store.check(["failed"]):
                    cause = self._store.get("failed").decode()
                    self._dead(f"{cause}; rank {self.rank} exits", PEER_FAILED_EXIT_CODE)
                    return
                now = time.monotonic()
                for r, (count, since) in list(last_seen.items()):
                    if self._store.add(f"done/{r}", 0):
                        del last_seen[r]
                        continue
                    current = self._store.add(f"hb/{r}", 0)
                    if current != count:
                        last_seen[r] = (current, now)
                    elif now - since > self.timeout_s:
                        self._dead(f"rank {r} (host {self._host_of(r)}) stopped: no heartbeat for "
                                   f"{now - since:.0f} s (died or hangs); rank {self.rank} exits")
                        return
                failures_since = None
            except Exception as err:  # noqa: BLE001 - a store that stops answering is the signal itself
                if self._stopped.is_set():
                    return
                failures_since = failures_since or time.monotonic()
                if time.monotonic() - failures_since > min(self.timeout_s, 3 * self.interval_s):
                    self._dead(f"rank 0 or its launcher (host of the rendezvous store {self.host}:{self.port}) "
                               f"stopped: the store does not answer ({str(err).splitlines()[0][:120]}); "
                               f"rank {self.rank} exits")
                    return

    def _host_of(self, rank: int) -> str:
        try:
            return self._store.get(f"host/{rank}").decode() if self._store.check([f"host/{rank}"]) else "?"
        except Exception:  # noqa: BLE001
            return "?"

    def _dead(self, message: str, code: int = EXIT_CODE) -> None:
        if self._stopped.is_set():
            return
        self.verdict = message
        self._decided.set()
        self.on_dead(message, code)


def _exit_with(message: str, code: int) -> None:
    log.error("%s", message)
    print(f"dydit watchdog: {message}", file=sys.stderr, flush=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def start_from_env(rank: int, world_size: int) -> Watchdog | None:
    """The watchdog for a multi-rank run, configured from the environment; None for one rank or when off."""
    timeout = float(os.environ.get("DYDIT_HEARTBEAT_TIMEOUT", "30"))
    interval = float(os.environ.get("DYDIT_HEARTBEAT_INTERVAL", "2"))
    if world_size < 2 or timeout <= 0 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return Watchdog(rank, world_size, host=os.environ["MASTER_ADDR"], port=int(os.environ["MASTER_PORT"]),
                    timeout_s=timeout, interval_s=min(interval, timeout / 3),
                    prefix=f"dydit/watchdog/{restart}/").start()
