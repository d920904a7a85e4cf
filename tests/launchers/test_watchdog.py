"""The rank watchdog in-process: heartbeats through a real TCPStore name a frozen rank or a lost store
quickly, and a rank that finished is never reported."""

from __future__ import annotations

import threading
from datetime import timedelta

import torch

from cluster import free_port
from dydit_scale.train.watchdog import Watchdog, is_comm_error


def _store(port: int) -> torch.distributed.TCPStore:
    return torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                      timeout=timedelta(seconds=10))


def _pair(port: int, verdicts: dict[int, str], **kw) -> list[Watchdog]:
    def recorder(rank: int):
        return lambda message, code: verdicts.setdefault(rank, (message, code))

    return [Watchdog(r, 2, host="127.0.0.1", port=port, on_dead=recorder(r), **kw).start() for r in (0, 1)]


def test_a_frozen_rank_is_named_by_the_others():
    port, verdicts = free_port(), {}
    master = _store(port)
    dogs = _pair(port, verdicts, timeout_s=1.5, interval_s=0.2)
    frozen = dogs[1]
    frozen._stopped.set()  # its heartbeat thread ends without saying goodbye: a SIGSTOPped or lost rank
    frozen._thread.join(timeout=5)
    dogs[0]._decided.wait(10)
    message, code = verdicts.get(0, ("", 0))
    assert "rank 1" in message and "no heartbeat" in message and code == 75, verdicts
    dogs[0].stop()
    del master


def test_a_lost_store_names_rank_zero():
    port, verdicts = free_port(), {}
    master = _store(port)
    dogs = _pair(port, verdicts, timeout_s=1.0, interval_s=0.2)
    del master  # the store lives in rank 0 (or its launcher): it is gone
    dogs[1]._decided.wait(10)
    assert "rank 0" in verdicts.get(1, ("", 0))[0], verdicts
    for dog in dogs:
        dog.stop()


def test_a_rank_that_finished_first_is_not_dead():
    port, verdicts = free_port(), {}
    master = _store(port)
    dogs = _pair(port, verdicts, timeout_s=0.6, interval_s=0.1)
    dogs[1].stop()
    threading.Event().wait(1.5)
    assert verdicts == {}
    dogs[0].stop()
    del master


def test_a_rank_that_fails_on_its_own_takes_the_others_with_it_naming_the_cause():
    port, verdicts = free_port(), {}
    master = _store(port)
    dogs = _pair(port, verdicts, timeout_s=30.0, interval_s=0.1)
    dogs[0].report_failure("data.shards: no readable sample")
    dogs[1]._decided.wait(5)
    threading.Event().wait(0.5)
    assert verdicts == {1: ("rank 0: data.shards: no readable sample; rank 1 exits", 2)}, verdicts
    for dog in dogs:
        dog.stop()
    del master


def test_only_communication_errors_wait_for_a_verdict():
    assert is_comm_error(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    assert not is_comm_error(ValueError("a bug on this rank"))
    assert not is_comm_error(RuntimeError("shape mismatch"))
