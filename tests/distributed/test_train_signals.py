"""SIGTERM / SIGUSR1 make the trainer write a checkpoint and exit cleanly; the next launch resumes."""

from __future__ import annotations

import signal
import time

import pytest

import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_checkpoints_and_exits_cleanly_then_resumes(tmp_path, tiny_model_dir, signum):
    from dydit_scale.train.checkpoint import complete_checkpoints

    launch.write_identical_shards(tmp_path / "shards", shards=2, per_shard=8)
    run = tmp_path / "runs" / "sig"
    common = ["data.workers=1", "validation.every_steps=1000", "log.tensorboard=false", "data.batch_size=2",
              f"model.path={tiny_model_dir('flux')}", f"data.shards={tmp_path / 'shards'}",
              f"run.output_dir={tmp_path / 'runs'}", "run.name=sig", "checkpoint.every_steps=1000"]
    process = launch.train([*common, "train.steps=1000"], popen=True)
    try:
        deadline = time.time() + 180
        while not (run / "metrics.jsonl").is_file() or len(launch.metrics(run)) < 2:
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "stop signal received" in output
    saved = complete_checkpoints(run / "checkpoints")
    assert saved, "no checkpoint written on the stop signal"
    step = int(saved[-1].name.split("-")[1])
    assert step == launch.metrics(run)[-1]["step"]
    launch.train([*common, f"train.steps={step + 2}"])
    assert [m["step"] for m in launch.metrics(run)][-2:] == [step + 1, step + 2]
