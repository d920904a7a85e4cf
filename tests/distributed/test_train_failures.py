"""Every failure during training ends every rank quickly with one line naming the cause and exit 2.

Each launch runs under a hard timeout, so a run that hangs (as it did when DataLoader workers that
ignore SIGTERM kept the interpreter's exit waiting) fails its test instead of the CI run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
DEADLINE_S = 60  # a bad-input run must be over within this, start-up included
QUIET = ["log.tensorboard=false", "validation.every_steps=1000", "data.workers=1"]


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _run(overrides: list[str], *, ranks: int = 1) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = launch.train([*QUIET, *overrides], ranks=ranks, timeout_s=DEADLINE_S, check=False)
    return result, time.monotonic() - started


def _assert_one_line_failure(result: subprocess.CompletedProcess, took: float, *needles: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode not in (124, 137), f"hung: killed after {took:.0f} s\n{output[-3000:]}"
    assert result.returncode == 2, f"rc {result.returncode}\n{output[-3000:]}"
    assert took < DEADLINE_S
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if "tiny_cpu.yaml: " in line]
    assert lines, output[-3000:]
    for needle in needles:
        assert any(needle in line for line in lines), (needle, lines)
    return lines[-1]


@pytest.fixture
def model(tiny_model_dir) -> str:
    return f"model.path={tiny_model_dir('flux')}"


def test_an_empty_shard_is_refused_before_the_run_folder_is_made(tmp_path, model):
    _tar(tmp_path / "shards" / "shard-000000.tar", {})
    result, took = _run([model, f"data.shards={tmp_path / 'shards'}", f"run.output_dir={tmp_path / 'runs'}"])
    _assert_one_line_failure(result, took, "hold 0 sample(s)", "start-up")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("members", [
    pytest.param(lambda i: {f"{i:04d}.txt": b"a red circle"}, id="captions-only"),
    pytest.param(lambda i: {f"{i:04d}.png": _png(), f"{i:04d}.txt": b"\xff\xfe not utf-8"}, id="invalid-utf8"),
])
def test_shards_with_no_usable_sample_end_the_run_with_one_line(tmp_path, model, members):
    _tar(tmp_path / "shards" / "shard-000000.tar", {k: v for i in range(16) for k, v in members(i).items()})
    result, took = _run([model, f"data.shards={tmp_path / 'shards'}", f"run.output_dir={tmp_path}", "train.steps=3"])
    _assert_one_line_failure(result, took, "bad samples in a row")


def test_shards_that_disappear_mid_run_end_it_with_one_line(tmp_path, model):
    shards = tmp_path / "shards"
    launch.write_identical_shards(shards, shards=2, per_shard=8)
    command = [*QUIET, model, f"data.shards={shards}", f"run.output_dir={tmp_path}", "run.name=gone",
               "train.steps=100000", "data.shuffle_buffer=0", "checkpoint.every_steps=100000"]
    process = launch.train(command, popen=True)
    metrics = tmp_path / "gone" / "metrics.jsonl"
    try:
        started = time.monotonic()
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() - started < DEADLINE_S, "no training step"
            time.sleep(0.2)
        shutil.rmtree(shards)
        removed = time.monotonic()
        output, _ = process.communicate(timeout=DEADLINE_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    took = time.monotonic() - removed
    _assert_one_line_failure(subprocess.CompletedProcess([], process.returncode, output, output), took,
                             "no readable sample")


def test_a_resume_whose_samples_are_gone_ends_with_one_line(tmp_path, model):
    shards = tmp_path / "shards"
    launch.write_identical_shards(shards, shards=2, per_shard=8)
    base = [model, f"data.shards={shards}", f"run.output_dir={tmp_path}", "run.name=r", "checkpoint.every_steps=1"]
    launch.train([*QUIET, *base, "train.steps=1"], timeout_s=DEADLINE_S)
    for tar in shards.glob("*.tar"):  # same names and sizes.json, but the samples are gone
        _tar(tar, {})
    result, took = _run([*base, "train.steps=3"])
    _assert_one_line_failure(result, took, "gone")


def test_one_rank_failing_ends_both_ranks_naming_the_cause(tmp_path, model):
    shards = tmp_path / "shards"
    launch.write_identical_shards(shards, shards=2, per_shard=8)
    _tar(shards / "shard-000001.tar", {f"{i:04d}.txt": b"a caption" for i in range(8)})  # one rank's share
    result, took = _run([model, f"data.shards={shards}", f"run.output_dir={tmp_path}", "train.steps=50",
                         "data.shuffle_buffer=0"], ranks=2)
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 124, 137), output[-3000:]
    assert took < DEADLINE_S
    assert "Traceback" not in output, output[-3000:]
    assert "bad samples in a row" in output, output[-3000:]


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def _fill(folder: Path, leave: int) -> Path:
    """Take all free space of `folder`'s device but `leave` bytes."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as handle:
        handle.truncate(0)
        chunk = b"\0" * 2**20
        remaining = free - leave
        while remaining > 0:
            remaining -= handle.write(chunk[: min(len(chunk), remaining)])
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, model):
    shards = tmp_path / "shards"
    launch.write_identical_shards(shards, shards=2, per_shard=8)
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64m")
    try:
        base = [model, f"data.shards={shards}", f"run.output_dir={disk}", "run.name=full", "checkpoint.every_steps=1"]
        launch.train([*QUIET, *base, "train.steps=1"], timeout_s=DEADLINE_S)
        step1 = disk / "full" / "checkpoints" / "step-0000001"
        assert (step1 / "dydit_state.json").is_file()
        filler = _fill(disk, leave=64 * 1024)  # room for log lines, not for a checkpoint
        result, took = _run([*base, "train.steps=3"])
        line = _assert_one_line_failure(result, took, "no space left on", str(disk))
        assert "step-0000001" in line, line
        filler.unlink()
        assert not list((disk / "full" / "checkpoints").glob("*.partial"))
        resumed = launch.train([*QUIET, *base, "train.steps=2"], timeout_s=DEADLINE_S)
        assert "resumed from" in resumed.stdout + resumed.stderr
        assert json.loads((disk / "full" / "checkpoints" / "step-0000002" / "dydit_state.json").read_text())["step"] == 2
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_truncated_model_weight_file_is_one_line_naming_it(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("flux"), model)
    weights = next((model / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shards = tmp_path / "shards"
    launch.write_identical_shards(shards, shards=1, per_shard=8)
    result, took = _run([f"model.path={model}", f"data.shards={shards}", f"run.output_dir={tmp_path / 'runs'}"])
    _assert_one_line_failure(result, took, str(weights), "start-up")
