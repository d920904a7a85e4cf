"""Spawned gloo ranks for in-process distributed tests: start, wait with a hard deadline, exit cleanly."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def run_ranks(worker: Callable[..., None], args: tuple, *, nprocs: int = 2, timeout_s: float = 120) -> None:
    """Run `worker(rank, *args)` on `nprocs` spawned processes; fail the test after `timeout_s`
    (a rank waiting forever in a collective is the bug these tests look for)."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{nprocs} ranks still running after {timeout_s:.0f} s (a rank waits in a collective?)")


def exit_after_success() -> None:
    """End a rank whose results are written and whose process group is destroyed. Skipping C++
    static destructors avoids a rare abort there ("terminate called without an active exception"
    from a still-joinable gloo/autograd thread) after all the work is done."""
    os._exit(0)
