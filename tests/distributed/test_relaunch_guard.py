"""A relaunch can neither destroy a run nor silently change what it trains.

A refused relaunch (a typo, or a change of the model, the dynamic or LoRA layout, or the objective)
exits 2 with one line and leaves every file of the run byte-identical; a relaunch that changes only
what may change (steps, LR, logging, checkpoint cadence, data paths) resumes, and keeps the earlier
recipe as recipe.1.yaml.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
QUIET = ["log.tensorboard=false", "validation.every_steps=1000", "data.workers=1"]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> dict:
    """A run with one committed checkpoint (step 1), shared by every relaunch below (each copies it)."""
    root = tmp_path_factory.mktemp("relaunch")
    shards = root / "shards"
    launch.write_identical_shards(shards, shards=2, per_shard=8)
    base = [*QUIET, f"model.path={tiny_model_dir('flux')}", f"data.shards={shards}", "run.name=r",
            "checkpoint.every_steps=1", "train.steps=1"]
    launch.train([*base, f"run.output_dir={root / 'runs'}"], timeout_s=120)
    return {"root": root, "base": base, "shards": shards}


def _copy(run: dict, tmp_path: Path) -> Path:
    out = tmp_path / "runs"
    shutil.copytree(run["root"] / "runs", out)
    return out


def _other_flux(tmp_path: Path) -> str:
    from dydit_scale.models.tiny import write_tiny_pipeline

    write_tiny_pipeline("flux", str(tmp_path / "flux_seed1"), seed=1)  # same architecture, other weights
    return str(tmp_path / "flux_seed1")


@pytest.mark.parametrize("change, field", [
    (lambda tmp, dirs: ["model.path=/no/such/model"], "/no/such/model"),
    (lambda tmp, dirs: ["dynamic.target_flops_ratio=0.5"], "dynamic.target_flops_ratio (0.6 -> 0.5)"),
    (lambda tmp, dirs: ["lora.kind=lora"], "lora.kind ('td_lora' -> 'lora')"),
    (lambda tmp, dirs: ["lora.rank=4"], "lora.rank (8 -> 4)"),
    (lambda tmp, dirs: ["train.timestep_weighting=logit_normal"], "objective.timestep_weighting"),
    (lambda tmp, dirs: [f"model.path={_other_flux(tmp)}"], "base model weights"),
    (lambda tmp, dirs: ["model.family=pixart", f"model.path={dirs('pixart')}"], "family ('flux' -> 'pixart')"),
], ids=["typo-in-model-path", "lambda", "lora-kind", "lora-rank", "objective", "other-base-model", "family"])
def test_a_refused_relaunch_leaves_every_file_of_the_run_as_it_was(run, tmp_path, tiny_model_dir, change, field):
    runs = _copy(run, tmp_path)
    before = _snapshot(runs)
    result = launch.train([*run["base"], f"run.output_dir={runs}", "train.steps=3", *change(tmp_path, tiny_model_dir)],
                          timeout_s=60, check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if "tiny_cpu.yaml: " in line]
    assert len(lines) == 1 and field in lines[0], lines
    assert _snapshot(runs) == before


def test_a_relaunch_that_changes_only_what_may_change_resumes_and_keeps_the_old_recipe(run, tmp_path):
    runs = _copy(run, tmp_path)
    moved = tmp_path / "moved_shards"
    shutil.copytree(run["shards"], moved)
    (runs / "r" / "checkpoints" / "step-0000009.partial").mkdir()  # a save that never finished
    old_recipe = (runs / "r" / "recipe.yaml").read_text()
    result = launch.train([*run["base"], f"run.output_dir={runs}", "train.steps=2", "optim.lr=5e-4",
                           "log.every_steps=1", "checkpoint.every_steps=2", f"data.shards={moved}"], timeout_s=120)
    assert "resumed from" in result.stdout + result.stderr
    assert (runs / "r" / "recipe.1.yaml").read_text() == old_recipe
    assert "lr: 0.0005" in (runs / "r" / "recipe.yaml").read_text()
    assert (runs / "r" / "checkpoints" / "step-0000002" / "dydit_state.json").is_file()
    assert not list((runs / "r" / "checkpoints").glob("*.partial"))
