"""The peak memory each metrics line carries is the process's real high-water mark."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, torch
from dydit_scale.train.metrics import peak_memory
before = peak_memory()
block = torch.ones(400 * 2**20 // 4)  # 400 MiB, touched
during = peak_memory()
del block
print(json.dumps([before, during, peak_memory()]))
"""


def test_max_rss_rises_with_a_large_allocation_and_never_falls():
    # a fresh process: the test runner's own earlier peaks would hide the allocation
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    before, during, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(before) == {"max_rss_gb"}  # no CUDA here, so no max_cuda_gb
    assert during["max_rss_gb"] - before["max_rss_gb"] > 0.3
    assert after["max_rss_gb"] >= during["max_rss_gb"] - 0.01  # the kernel's counters sync lazily
