"""The launchers with the real trainer, without SLURM: one node × 2 ranks (train_node.sh), two nodes ×
1 rank through the hostfile launcher with --no_ssh in two network namespaces (train_hostfile.sh), a
rank killed mid-run, and a resume at another world size (universal checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from cluster import (RECIPE, NetnsPair, finish, free_port, launch, launch_env, rank_pid, start, tail, wait_for)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path, key: str = "diffusion_loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in _metrics(run)}


def _two_nodes(tmp: Path, overrides: list[str], tag: str, netns: NetnsPair | None, **env: str):
    """Start node ranks 0 and 1 of a 2-node run (1 rank each) with train_hostfile.sh NO_SSH=1."""
    hostfile = tmp / "hostfile"
    hostfile.write_text("# two 'nodes' on this machine\nnode0 slots=1\nnode1 slots=1\n")
    addr = netns.addrs[0] if netns else "127.0.0.1"
    port = str(free_port())
    nodes = []
    for node in (0, 1):
        extra = {"NO_SSH": "1", "NODE_RANK": str(node), "MASTER_ADDR": addr, "MASTER_PORT": port,
                 "HOSTFILE": str(hostfile), **env}
        if netns:
            extra["GLOO_SOCKET_IFNAME"] = netns.ifaces[node]
        log = tmp / f"{tag}-node{node}.log"
        nodes.append((start(["bash", "launchers/train_hostfile.sh", str(RECIPE), *overrides], log, launch_env(**extra),
                            prefix=netns.prefix(node) if netns else ()), log))
    return nodes


@pytest.fixture(scope="module")
def netns():
    """Two network namespaces, or None (loopback) where they cannot be made."""
    pair = NetnsPair()
    try:
        pair.start()
    except Exception:  # noqa: BLE001 - no CAP_NET_ADMIN / no ip: fall back to loopback
        pair.stop()
        yield None
        return
    yield pair
    pair.stop()


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, base_overrides) -> Path:
    """Reference: 1 node × 2 ranks via train_node.sh, 8 steps, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("one_node")
    log = out / "one.log"
    process = start(["bash", "launchers/train_node.sh", str(RECIPE), *base_overrides, "train.steps=8",
                     "checkpoint.every_steps=2", f"run.output_dir={out}", "run.name=one"], log,
                    launch_env(NGPU="2", MASTER_PORT=str(free_port())))
    assert finish(process, log) == 0, tail(log)
    return out / "one"


def test_two_nodes_match_one_node_a_killed_rank_is_named_and_a_relaunch_resumes(tmp_path, base_overrides, one_node,
                                                                                   netns):
    """2 nodes × 1 rank (namespaces): kill -9 rank 1 after the first checkpoint; node 0 exits within 60 s
    naming it; relaunching the 2 nodes resumes from the last complete checkpoint, and every step's
    loss matches the 1-node × 2-rank run on the same global batch."""
    from dydit_scale.train.checkpoint import complete_checkpoints

    run = tmp_path / "two"
    common = [*base_overrides, "checkpoint.every_steps=2", f"run.output_dir={tmp_path}", "run.name=two"]
    fast_watchdog = {"DYDIT_HEARTBEAT_TIMEOUT": "6", "DYDIT_HEARTBEAT_INTERVAL": "1"}
    nodes = _two_nodes(tmp_path, [*common, "train.steps=10000"], "kill", netns, **fast_watchdog)
    (node0, log0), (node1, _) = nodes
    try:
        wait_for(lambda: (run / "checkpoints" / "latest").is_file(), 150, "a first checkpoint", node0, log0)
        os.kill(wait_for(lambda: rank_pid(node1.pid, 1), 10, "rank 1's pid"), signal.SIGKILL)
        killed_at = time.time()
        rc = finish(node0, log0, timeout_s=90)
        took = time.time() - killed_at
    finally:
        for process, _ in nodes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
    output = tail(log0, 100_000)
    assert rc != 0 and took < 60, f"node 0 exited rc {rc} {took:.0f} s after rank 1 was killed"
    assert "rank 1" in output and "stopped" in output, output[-2000:]
    last = int(complete_checkpoints(run / "checkpoints")[-1].name.split("-")[1])
    assert last < 8, f"the kill came late (step {last}); the reference run has 8 steps"
    nodes = _two_nodes(tmp_path, [*common, f"train.steps={last + 2}"], "resume", netns)
    for process, log in nodes:
        assert finish(process, log) == 0, tail(log)
    assert f"resumed from {run / 'checkpoints' / f'step-{last:07d}'}" in tail(tmp_path / "resume-node0.log", 100_000)
    two, one = _losses(run), _losses(one_node)  # a step run twice (after the kill) keeps its resumed value
    assert sorted(two) == list(range(1, last + 3))
    assert [two[s] for s in sorted(two)] == pytest.approx([one[s] for s in sorted(two)], rel=1e-4, abs=1e-5)
    assert json.loads((run / "env.json").read_text())["world_size"] == 2


def test_resume_on_one_rank_from_two_needs_universal_and_then_continues_the_run(tmp_path, base_overrides, one_node):
    """2 ranks × batch 2 = 1 rank × 2 micro-batches of 2 on identical samples: steps 3-4 after a universal
    resume at world size 1 reproduce the 2-rank run, optimizer state included."""
    step2 = one_node / "checkpoints" / "step-0000002"
    common = [*base_overrides, "train.steps=4", "train.grad_accum=2", "checkpoint.every_steps=100",
              f"run.output_dir={tmp_path}", "run.name=single", f"checkpoint.resume={step2}",
              "checkpoint.universal=true", "data.resume_policy=reshuffle"]
    result = launch.train(common, ranks=1, timeout_s=150)
    assert "data.resume_policy=reshuffle" in result.stdout + result.stderr
    assert (step2 / "universal" / "zero").is_dir()
    single, one = _losses(tmp_path / "single"), _losses(one_node)
    assert sorted(single) == [3, 4]
    assert [single[3], single[4]] == pytest.approx([one[3], one[4]], rel=1e-4, abs=1e-5)
