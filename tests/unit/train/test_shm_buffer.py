"""A run leaves no DeepSpeed all-reduce segment behind in /dev/shm (RAM that no process would free)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

PROBE = """
import json, os, pathlib, torch
import deepspeed
from dydit_scale.train.env import unlink_shm_allreduce_buffer
deepspeed.init_distributed(dist_backend="gloo")
path = pathlib.Path("/dev/shm/deepspeed_allreduce_buffer_{}_127.0.0.1_{}_0".format(os.getuid(), os.environ["MASTER_PORT"]))
existed = path.exists()
unlink_shm_allreduce_buffer()
summed = torch.ones(3)
torch.distributed.all_reduce(summed)
print(json.dumps([existed, path.exists(), summed.tolist()]))
"""


def test_the_shared_memory_name_is_gone_once_the_group_is_up():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", LOCAL_SIZE="1", DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=180, env=env,
                         check=True)
    existed, exists_after, summed = json.loads(out.stdout.strip().splitlines()[-1])
    assert existed  # DeepSpeed made it: otherwise this test would prove nothing
    assert not exists_after
    assert summed == [1.0, 1.0, 1.0]
