"""`dydit-export` and `dydit-sample` on real tiny run folders (TD-LoRA and full fine-tuning, 2 steps each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from infer_cases import model_inputs
from PIL import Image

from dydit_scale import RouterSchedule, cli
from dydit_scale.dynamic.routers import full_width
from dydit_scale.infer.keys import sampler_time_keys
from dydit_scale.infer.runs import load_run

REPO = Path(__file__).resolve().parents[3]
ENV = {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions")}


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Two 2-step runs of recipes/tiny_cpu.yaml (td_lora, and lora.kind=none), trained side by side."""
    root = tmp_path_factory.mktemp("tiny_runs")
    shards = root / "shards"
    synth = [sys.executable, "-c", "import sys; from data_tools.cli import main; sys.exit(main(sys.argv[1:]))",
             "synth", "--shards", "image", str(shards), "--count", "32", "--per-shard", "8"]
    subprocess.run(synth, check=True, capture_output=True, env={**os.environ, **ENV})
    common = [sys.executable, "-m", "dydit_scale.train", "recipes/tiny_cpu.yaml", f"model.path={tiny_model_dir('flux')}",
              f"data.shards={shards}", f"run.output_dir={root}", "train.steps=2", "checkpoint.every_steps=2",
              "validation.every_steps=100", "validation.seeds=[0]", "validation.prompts=[a red circle]",
              "validation.inference_steps=1"]
    runs = {"td_lora": [], "full": ["lora.kind=none"]}
    procs = {name: subprocess.Popen(common + [f"run.name={name}", *extra], cwd=REPO, env={**os.environ, **ENV},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, extra in runs.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} training failed:\n{out[-3000:]}"
    return {name: root / name for name in runs}


def _same_files(a: Path, b: Path) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in ("schedule.safetensors", "schedule.json"))


@pytest.mark.slow
def test_export_cli_writes_the_schedule_and_regenerates_it_exactly(tiny_runs, tiny_model_dir, tmp_path, capsys):
    run = tiny_runs["td_lora"]
    assert cli.export([str(run), str(tmp_path / "a"), "--steps", "3"]) == 0
    schedule = RouterSchedule.load(tmp_path / "a")
    expected = sampler_time_keys("flux", steps=3, resolution=(32, 32), pipeline=tiny_model_dir("flux")).values
    assert torch.equal(schedule.time_keys.values, expected)
    assert schedule.source["step"] == 2 and schedule.source["lora"] == "td_lora"
    assert all(mask[:, 0].all() for mask in schedule.masks.values())
    assert Image.open(tmp_path / "a" / "schedule.png").size[0] > 300
    ratio, target = float(schedule.flops_ratio.mean()), schedule.target_flops_ratio
    assert ("warning: the exported mean FLOPs ratio" in capsys.readouterr().err) == (abs(ratio - target) > 0.03)
    step_folder = run / "checkpoints" / "step-0000002"
    assert cli.export([str(step_folder), str(tmp_path / "b"), "--steps", "3"]) == 0
    assert _same_files(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_sample_cli_writes_a_grid_and_a_compute_map(tiny_runs, tmp_path):
    run = tiny_runs["td_lora"]
    assert cli.export([str(run), str(tmp_path / "schedule"), "--steps", "2"]) == 0
    argv = [str(run), str(tmp_path / "out"), "--schedule", str(tmp_path / "schedule"), "--prompt", "a red circle",
            "--seed", "0", "--seed", "1"]
    assert cli.sample(argv) == 0
    width, height = Image.open(tmp_path / "out" / "samples.png").size
    assert height > 1.5 * width  # 2 seeds × 1 prompt: a column of two images
    assert Image.open(tmp_path / "out" / "compute_map.png").size[0] > 300


@pytest.mark.slow
def test_sample_cli_step_cache_reuses_steps_and_says_so(tiny_runs, tmp_path, capsys):
    pytest.importorskip("cache_dit")
    run = tiny_runs["td_lora"]
    assert cli.export([str(run), str(tmp_path / "schedule"), "--steps", "6"]) == 0
    common = [str(run), str(tmp_path / "out"), "--schedule", str(tmp_path / "schedule"), "--prompt", "a red circle",
              "--seed", "0", "--seed", "1", "--cache", "dbcache"]
    capsys.readouterr()
    assert cli.sample(common) == 2  # the recipe's default fn = 8 leaves none of the tiny model's 2 blocks
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fn 8 + bn 0 blocks always run, but transformer_blocks has 2" in err
    assert cli.sample([*common, "--cache-fn", "1", "--cache-warmup", "2", "--cache-threshold", "100"]) == 0
    assert capsys.readouterr().out.strip().endswith("step cache: 4.0 steps per sample reused (4, 4)")
    assert Image.open(tmp_path / "out" / "compute_map.png").size[0] > 300


@pytest.mark.slow
def test_sample_steps_and_resolution_only_where_the_schedule_holds_their_keys(tiny_runs, tmp_path, capsys):
    run = tiny_runs["td_lora"]
    assert cli.export([str(run), str(tmp_path / "schedule"), "--steps", "4"]) == 0
    common = [str(run), str(tmp_path / "out"), "--schedule", str(tmp_path / "schedule"), "--prompt", "a red circle",
              "--seed", "0"]
    assert cli.sample([*common, "--steps", "2", "--guidance", "2.0"]) == 0  # σ 1 and 0.5 are among 4 steps' keys
    # the tiny pipeline's scheduler does not shift σ by resolution, so 64 px has the same keys
    assert cli.sample([*common, "--resolution", "64"]) == 0
    capsys.readouterr()
    assert cli.sample([*common, "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exported for 4 steps at 32x32" in err and "dydit-export --steps 3 --resolution 32x32" in err


@pytest.mark.slow
def test_td_lora_save_transformer_is_refused_before_any_work(tiny_runs, tmp_path, capsys):
    assert cli.export([str(tiny_runs["td_lora"]), str(tmp_path / "out"), "--steps", "2", "--save-transformer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "dydit-sample" in err and "dydit_scale.load_run" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_full_finetuning_export_consolidates_zero_and_saves_a_diffusers_transformer(tiny_runs, tmp_path, capsys):
    argv = [str(tiny_runs["full"]), str(tmp_path), "--steps", "2", "--save-transformer", "--max-shard-size", "200KB"]
    assert cli.export(argv) == 0
    assert f"{tmp_path}/transformer: FluxTransformer2DModel.from_pretrained loads it" in capsys.readouterr().out
    assert len(list((tmp_path / "transformer").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    fine_tuned = RouterSchedule.load(tmp_path).base_model_hash
    assert cli.export([str(tiny_runs["td_lora"]), str(tmp_path / "lora"), "--steps", "2"]) == 0
    assert fine_tuned != RouterSchedule.load(tmp_path / "lora").base_model_hash  # weights were trained
    stock = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    dynamic = load_run(tiny_runs["full"], consolidate=cli._zero_state_dict).model
    inputs = model_inputs("flux", torch.tensor(0.5))
    with torch.no_grad(), full_width(dynamic):
        torch.testing.assert_close(stock(**inputs).sample, dynamic(**inputs).sample, atol=1e-5, rtol=0)


def test_export_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert cli.export([str(tmp_path / "missing"), str(tmp_path / "out"), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dydit-export: ") and "\n" not in err
    assert cli.sample([str(tmp_path), str(tmp_path / "out"), "--schedule", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.slow
def test_a_truncated_schedule_or_model_weight_file_is_one_line_naming_it(tiny_runs, tmp_path, capsys):
    import shutil

    run = tiny_runs["td_lora"]
    assert cli.export([str(run), str(tmp_path / "schedule"), "--steps", "2"]) == 0
    capsys.readouterr()
    tensors = tmp_path / "schedule" / "schedule.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    assert cli.sample([str(run), str(tmp_path / "out"), "--schedule", str(tmp_path / "schedule")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tensors) in err
    routers = tmp_path / "run" / "checkpoints" / "step-0000002" / "routers.safetensors"
    shutil.copytree(run, tmp_path / "run")
    routers.write_bytes(routers.read_bytes()[:-10])
    assert cli.export([str(tmp_path / "run"), str(tmp_path / "again"), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(routers) in err
