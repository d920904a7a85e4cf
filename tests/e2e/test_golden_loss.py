"""Golden loss series (torchtune style): the demo recipe, trained for a few steps on one CPU process,
reproduces the per-step losses and FLOPs ratio stored in `tests/assets/golden_tiny_cpu.json`.

Any silent change of the numerics (router init, FLOPs accounting, loss terms, noise or timestep
sampling, data order, LR schedule) fails here. When a change of the numbers is intended, regenerate
the asset and commit it with the change:

    DYDIT_UPDATE_GOLDEN=1 python -m pytest -q tests/e2e/test_golden_loss.py -p no:cacheprovider

That run trains, rewrites the asset (recording the recipe, overrides, steps, versions and commit) and
reports itself as skipped, so a regeneration is never mistaken for a pass.

The tiny pipeline is `write_tiny_pipeline("flux", seed=0)` with its two tokenizers replaced by the ones
stored in `tests/assets/golden_tiny_cpu_tokenizers/`: the weights are seeded, but the tokenizers are
trained by `tokenizers`, whose trainer assigns ids in a different order on every call, which moves
the losses by ~3e-3. A regeneration keeps the stored tokenizers (and stores fresh ones only when that
folder is missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = "recipes/tiny_cpu.yaml"
ASSET = REPO / "tests" / "assets" / "golden_tiny_cpu.json"
TOKENIZERS = REPO / "tests" / "assets" / "golden_tiny_cpu_tokenizers"
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")
STEPS = 5
HARD_TIMEOUT_S = 60  # the run takes ~8 s on one free core; `timeout -k` kills a hung one (pytest-timeout is not a dependency)
#: The run's own knobs on top of tiny_cpu.yaml (model.path, data.shards and run.output_dir are added
#: per run). λ_eff is held 0 steps and warmed up over 4, so the FLOPs loss and the routers are
#: exercised within the 5 steps; no TensorBoard import, to keep it fast.
OVERRIDES = [f"train.steps={STEPS}", "log.tensorboard=false", "dynamic.target_hold_steps=0",
             "dynamic.target_warmup_steps=4"]
#: Compared per step; samples_per_s and skipped are not numerics.
KEYS = ("loss", "diffusion_loss", "complete_loss", "flops_loss", "flops_ratio", "lambda_eff", "lr")
RTOL, ATOL = 1e-4, 1e-6
SHARDS = {"kind": "image", "count": 32, "per_shard": 8, "seed": 0, "image_format": "png"}

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        env.pop(key, None)
    return env


def _versions() -> dict[str, str]:
    import deepspeed
    import diffusers
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "diffusers": diffusers.__version__}


def _commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _model(tmp_path: Path, fresh_dir: str, update: bool) -> Path:
    """The seeded tiny FLUX pipeline with the stored (fixed) tokenizers."""
    model = tmp_path / "tiny_flux"
    shutil.copytree(fresh_dir, model)
    if update and not TOKENIZERS.is_dir():
        for name in TOKENIZER_DIRS:
            shutil.copytree(model / name, TOKENIZERS / name)
    for name in TOKENIZER_DIRS:
        shutil.rmtree(model / name)
        shutil.copytree(TOKENIZERS / name, model / name)
    return model


def _train(tmp_path: Path, model_dir: Path) -> list[dict]:
    from dydit_scale.data.synthetic import write_synthetic_shards

    shards = tmp_path / "shards"
    kind, count = SHARDS["kind"], SHARDS["count"]
    write_synthetic_shards(shards, kind, count, per_shard=SHARDS["per_shard"], seed=SHARDS["seed"],
                           image_format=SHARDS["image_format"])
    command = [sys.executable, "-m", "dydit_scale.train", RECIPE, *OVERRIDES, f"model.path={model_dir}",
               f"data.shards={shards}", f"run.output_dir={tmp_path / 'runs'}"]
    result = subprocess.run(["timeout", "-k", "10", str(HARD_TIMEOUT_S), *command], cwd=REPO, env=_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, (f"training failed (rc {result.returncode}; 124 = still running after "
                                    f"{HARD_TIMEOUT_S} s):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    lines = (tmp_path / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _write_asset(rows: list[dict]) -> None:
    series = {key: [row[key] for row in rows] for key in KEYS}
    asset = {
        "about": "Per-step metrics of recipes/tiny_cpu.yaml for the golden-loss test (tests/e2e/test_golden_loss.py); "
                 "regenerate with DYDIT_UPDATE_GOLDEN=1 python -m pytest -q tests/e2e/test_golden_loss.py",
        "recipe": RECIPE,
        "overrides": OVERRIDES,
        "steps": STEPS,
        "model": "dydit_scale.models.tiny.write_tiny_pipeline('flux', seed=0), tokenizer/ and tokenizer_2/ "
                 "replaced by tests/assets/golden_tiny_cpu_tokenizers/",
        "shards": f"dydit_scale.data.synthetic.write_synthetic_shards(kind={SHARDS['kind']!r}, count={SHARDS['count']}, "
                  f"per_shard={SHARDS['per_shard']}, seed={SHARDS['seed']}, image_format={SHARDS['image_format']!r})",
        "launch": "python -m dydit_scale.train (one process, DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1)",
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "versions": _versions(),
        "commit": _commit(),
        "series": series,
    }
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    ASSET.write_text(json.dumps(asset, indent=2) + "\n")


def test_tiny_cpu_recipe_reproduces_the_golden_loss_series(tmp_path, tiny_model_dir):
    update = os.environ.get("DYDIT_UPDATE_GOLDEN") == "1"
    rows = _train(tmp_path, _model(tmp_path, tiny_model_dir("flux"), update))
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    if update:
        _write_asset(rows)
        pytest.skip(f"DYDIT_UPDATE_GOLDEN=1: rewrote {ASSET.relative_to(REPO)}")
    golden = json.loads(ASSET.read_text())
    assert (golden["recipe"], golden["overrides"], golden["steps"]) == (RECIPE, OVERRIDES, STEPS), \
        "the asset was recorded with other settings; regenerate it with DYDIT_UPDATE_GOLDEN=1"
    hint = ("numerics changed; if intended, regenerate with DYDIT_UPDATE_GOLDEN=1 "
            f"(asset recorded with {golden['versions']} at {golden['commit']})")
    for key in KEYS:
        got = [row[key] for row in rows]
        assert got == pytest.approx(golden["series"][key], rel=RTOL, abs=ATOL), f"{key} per step: {hint}"
