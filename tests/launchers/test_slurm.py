"""A real SLURM on localhost with two nodes (two slurmd): launchers/submit.sh runs the tiny recipe as a
2-node job (one srun task per node, torchrun with a c10d rendezvous at the head node); USR1 to the
batch shell makes the ranks checkpoint, the job requeues itself and the requeued run resumes from that
checkpoint to completion."""

from __future__ import annotations

import json
import subprocess

import pytest

from cluster import REPO, RECIPE, LocalSlurm, free_port, launch_env, slurm_missing, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_missing()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        cluster.start()
    except Exception as err:  # noqa: BLE001 - report why, then clean up what did start
        cluster.stop()
        pytest.skip(f"local SLURM did not start: {err}")
    yield cluster
    cluster.stop()


def test_two_node_job_checkpoints_on_usr1_requeues_and_resumes_to_completion(slurm, tmp_path, base_overrides):
    steps = 40
    run = tmp_path / "slurm2"
    env = launch_env(SLURM_CONF=str(slurm.conf), RDZV_PORT=str(free_port()))
    submitted = subprocess.run(
        ["timeout", "60", "bash", "launchers/submit.sh", str(RECIPE), "2", *base_overrides, f"train.steps={steps}",
         "checkpoint.every_steps=1000", f"run.output_dir={tmp_path}", "run.name=slurm2"],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.split()[-1]
    logs = lambda: "".join(p.read_text(errors="replace") for p in sorted((run / "slurm").glob("*.out")))  # noqa: E731
    log_tail = lambda: logs().replace("\r", "\n")[-3000:]  # noqa: E731
    state = lambda: slurm.job(job)  # noqa: E731
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip(), 150,
                 f"the first step of job {job}\n{log_tail()}")
        assert state().get("JobState") == "RUNNING", state()
        slurm.run("scancel", "--signal=USR1", "--batch", job)
        wait_for(lambda: state().get("Restarts") == "1", 90, f"job {job} to requeue itself\n{log_tail()}")

        def finished() -> bool:  # the requeued job waits cred_expire (10 s here) before it starts again
            return state().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

        wait_for(finished, 180, f"job {job} to finish after the requeue ({state()})")
    finally:
        if state().get("JobState") in ("RUNNING", "PENDING", "REQUEUED"):
            slurm.run("scancel", job, check=False)
    final = state()
    text = logs()
    summary = {key: final.get(key) for key in ("JobState", "Reason", "ExitCode", "Restarts")}
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", \
        f"{summary}\n{log_tail()}\n{slurm.daemon_logs()}"
    assert "2 node(s)" in text and "USR1 received" in text and "requeueing job" in text, log_tail()
    stopped = [line for line in text.splitlines() if "stop signal received: checkpoint at step" in line]
    assert stopped, log_tail()
    at = int(stopped[0].split("checkpoint at step ")[1].split()[0])
    assert 0 < at < steps
    assert f"resumed from {run / 'checkpoints' / f'step-{at:07d}'} at step {at}" in text
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(m["loss"] == m["loss"] for m in metrics)  # no NaN
    assert (run / "checkpoints" / f"step-{steps:07d}" / "dydit_state.json").is_file()
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
