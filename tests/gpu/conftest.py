"""GPU parity fixtures: the device, the attention backends, and a log of every measured difference.

The tests run on CUDA and skip without it. `dydit-bench gpu-check --allow-cpu` sets DYDIT_GPU_TESTS_ON_CPU=1
so that the same tests run on CPU at tiny widths, which tests the check's plumbing on machines without
a GPU. DYDIT_PARITY_LOG names a JSONL file that receives one line per comparison, for the check's table.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dydit_scale.models.build import attention_problem

ON_CPU = "DYDIT_GPU_TESTS_ON_CPU"
PARITY_LOG = "DYDIT_PARITY_LOG"


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(ON_CPU) == "1":
        return torch.device("cpu")
    pytest.skip("needs CUDA")


@pytest.fixture(params=["sdpa", "xformers"])
def backend(request: pytest.FixtureRequest, device: torch.device) -> str:
    """The fast path's attention kernel; xformers only where it can run."""
    if request.param == "xformers":
        problem = attention_problem("xformers")
        if problem is not None:
            pytest.skip(problem.removeprefix("model.attention: ").split(";")[0])
    return request.param


@pytest.fixture
def record(request: pytest.FixtureRequest):
    """`record(**values)`: one JSON line in $DYDIT_PARITY_LOG (nothing when unset), with the test's id."""

    def write(**values: object) -> None:
        path = os.environ.get(PARITY_LOG)
        if path:
            with open(path, "a") as handle:
                handle.write(json.dumps({"test": request.node.nodeid, **values}) + "\n")

    return write
