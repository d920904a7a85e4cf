"""A checkpoint is data, never code: a planted `__reduce__` object in any DeepSpeed file of a real run
is refused (exit 2, one line naming the file) on resume, universal conversion, export and sampling,
and never runs; clean ZeRO-2/3 checkpoints still resume and export. (The data benchmark's bare loader
is checked the same way in tests/unit/bench/test_bench_data.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import launch

COMMON = ["lora.kind=none", "train.steps=2", "checkpoint.every_steps=2", "data.batch_size=2", "data.workers=1",
          "data.shuffle_buffer=0", "validation.every_steps=1000", "log.tensorboard=false"]
STEP = "step-0000002"
CLI = "import sys; from dydit_scale import cli; sys.exit(cli.{}(sys.argv[1:]))"


class _Touch:
    """Unpickling this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def _plant(file: Path, marker: Path) -> None:
    state = torch.load(file, map_location="cpu", weights_only=False)  # our own freshly trained file
    state["planted"] = _Touch(marker)
    torch.save(state, file)


def _run(command: list[str], timeout_s: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", "-k", "10", str(timeout_s), *command], cwd=launch.REPO, env=launch.env(),
                          capture_output=True, text=True)


def _cli(name: str, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", CLI.format(name), *args])


def _assert_refused(result: subprocess.CompletedProcess, planted: Path, marker: Path) -> None:
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert not marker.exists(), "the planted payload ran"
    assert result.returncode == 2, output
    lines = [line for line in result.stderr.splitlines() if str(planted) in line]
    assert len(lines) == 1 and "refused to load" in lines[0], output
    assert "Traceback" not in result.stdout + result.stderr, output


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir) -> list[str]:
    shards = tmp_path_factory.mktemp("shards")
    launch.write_identical_shards(shards, shards=2, per_shard=8)
    return [*COMMON, f"model.path={tiny_model_dir('flux')}", f"data.shards={shards}"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, base) -> Path:
    """One 2-step ZeRO-2 full fine-tuning run; each test tampers with its own copy."""
    root = tmp_path_factory.mktemp("runs")
    launch.train([*base, f"run.output_dir={root}", "run.name=full"], timeout_s=300)
    return root / "full"


@pytest.fixture
def copy_run(full_run, tmp_path):
    """`copy(name)`: a fresh copy of the full run, as run `name` under tmp_path/runs."""
    def make(name: str) -> Path:
        return Path(shutil.copytree(full_run, tmp_path / "runs" / name))

    return make


def _resume(base: list[str], run: Path, *extra: str) -> subprocess.CompletedProcess:
    return launch.train([*base, f"run.output_dir={run.parent}", f"run.name={run.name}", "train.steps=3", *extra],
                        timeout_s=240, check=False)


@pytest.mark.distributed
@pytest.mark.slow
def test_planted_model_states_are_refused_by_resume_export_and_sample(base, copy_run, tmp_path):
    clean = copy_run("clean")
    assert _cli("export", str(clean), str(tmp_path / "schedule"), "--steps", "2").returncode == 0
    run = copy_run("tampered")
    planted = run / "checkpoints" / STEP / "mp_rank_00_model_states.pt"
    pristine = planted.read_bytes()
    commands = {"resume": lambda: _resume(base, run),
                "export": lambda: _cli("export", str(run), str(tmp_path / "out"), "--steps", "2"),
                "sample": lambda: _cli("sample", str(run), str(tmp_path / "samples"), "--schedule",
                                       str(tmp_path / "schedule"), "--prompt", "a red circle", "--seed", "0")}
    for name, command in commands.items():  # a marker of its own for each, planted in the pristine file
        planted.write_bytes(pristine)
        _plant(planted, tmp_path / f"marker-{name}")
        _assert_refused(command(), planted, tmp_path / f"marker-{name}")


@pytest.mark.distributed
@pytest.mark.slow
def test_planted_optimizer_states_are_refused_on_resume(base, copy_run, tmp_path):
    run, marker = copy_run("tampered"), tmp_path / "marker"
    planted = run / "checkpoints" / STEP / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _plant(planted, marker)
    _assert_refused(_resume(base, run), planted, marker)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("file", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "universal/zero/optimizer_state.pt",
                                  "universal/zero/proj_out.weight/fp32.pt", "universal/mp_rank_00_model_states.pt"])
def test_planted_files_are_refused_on_universal_resume(base, copy_run, tmp_path, file):
    """In the input of ds_to_universal, or in an earlier conversion that the resume would reuse."""
    run, marker = copy_run("tampered"), tmp_path / "marker"
    step = run / "checkpoints" / STEP
    if file.startswith("universal/"):  # converted by DeepSpeed itself while the files are clean
        convert = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step),
                   "--output_folder", str(step / "universal"), "--inject_missing_state",
                   "--num_extract_workers", "1", "--num_merge_workers", "1"]
        assert _run(convert).returncode == 0
    _plant(step / file, marker)
    _assert_refused(_resume(base, run, "checkpoint.universal=true"), step / file, marker)
    assert file.startswith("universal/") or not (step / "universal").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_clean_zero3_full_finetuning_resumes_plainly_and_through_universal_and_exports(base, tmp_path):
    """The allow-list covers what DeepSpeed really stores (ZeRO-2 and LoRA are covered by the other
    resume and export tests)."""
    common = [*base, "train.zero_stage=3", f"run.output_dir={tmp_path}"]
    launch.train([*common, "run.name=z3"], timeout_s=300)
    launch.train([*common, "run.name=z3", "train.steps=3"], timeout_s=300)
    launch.train([*common, "run.name=z3", "train.steps=4", "checkpoint.universal=true"], timeout_s=300)
    assert [m["step"] for m in launch.metrics(tmp_path / "z3")] == [1, 2, 3, 4]
    assert (tmp_path / "z3" / "checkpoints" / "step-0000003" / "universal" / "zero").is_dir()
    result = _cli("export", str(tmp_path / "z3"), str(tmp_path / "schedule"), "--steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
