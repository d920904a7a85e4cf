"""DataLoader workers start from a fork server (not from the trainer, whose pages they would keep)
and still die with a trainer that is killed outright."""

from __future__ import annotations

import subprocess
import sys
import time

PROBE = """
import os, signal, sys
from dydit_scale.config import DataConfig
from dydit_scale.data.loader import build_loader
loader = build_loader(DataConfig(shards=sys.argv[1], resolution=64, batch_size=2, workers=2, shuffle_buffer=0),
                      seed=0, rank=0, world_size=1)
batches = iter(loader)
next(batches)
workers = [w.pid for w in loader._live._workers]
print(" ".join(str(pid) for pid in workers), flush=True)
print(" ".join(open(f"/proc/{pid}/stat").read().split()[3] for pid in workers), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_are_not_children_of_the_trainer_and_exit_when_it_is_killed(clean_image_shards):
    probe = subprocess.Popen([sys.executable, "-c", PROBE, str(clean_image_shards)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    stdout, stderr = probe.communicate(timeout=60)  # would time out if orphans held its pipes open
    lines = stdout.split("\n")
    assert probe.returncode == -9 and len(lines) >= 2, stderr[-2000:]
    workers, parents = [int(p) for p in lines[0].split()], [int(p) for p in lines[1].split()]
    assert len(workers) == 2
    assert probe.pid not in parents  # forked by the server: the trainer's memory is not theirs
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)
    for pid in parents:  # the fork server goes with its last worker
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid)
