"""DyDiT end to end: recipes/dit_tiny_cpu.yaml on class-labelled shards, 2 ranks, then export and sample."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from launch import REPO, metrics, train
from PIL import Image

from dydit_scale import RouterSchedule, cli
from dydit_scale.infer.runs import load_run

RECIPE = REPO / "recipes" / "dit_tiny_cpu.yaml"
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 40)]


def _class_shards(folder: Path, *, shards: int = 2, per_shard: int = 16) -> Path:
    """ImageNet-style shards: `{key}.png` + `{key}.cls`, the class deciding the colour."""
    folder.mkdir(parents=True)
    sizes = {}
    for shard in range(shards):
        name = f"shard-{shard:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for index in range(per_shard):
                label = (shard * per_shard + index) % len(COLOURS)
                buf = io.BytesIO()
                Image.new("RGB", (24, 24), COLOURS[label]).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{shard:02d}{index:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return folder


@pytest.mark.slow
def test_dit_trains_on_class_labels_on_two_ranks_then_exports_and_samples(tmp_path, tiny_model_dir):
    shards = _class_shards(tmp_path / "shards")
    train([f"model.path={tiny_model_dir('dit')}", f"data.shards={shards}", f"run.output_dir={tmp_path}",
           "run.name=dit", "train.steps=4", "checkpoint.every_steps=4", "validation.every_steps=4",
           "data.workers=1"], ranks=2, recipe=RECIPE, timeout_s=400)
    run = tmp_path / "dit"
    rows = [row for row in metrics(run) if "loss" in row]
    assert rows and all(math.isfinite(row["loss"]) for row in rows)
    assert rows[-1]["step"] == 4 and 0 < rows[-1]["flops_ratio"] <= 1
    grids = sorted((run / "samples").glob("*.png"))
    assert grids, "the validation grid of the class prompts was not written"

    assert cli.export([str(run), str(tmp_path / "schedule"), "--steps", "4"]) == 0
    schedule = RouterSchedule.load(tmp_path / "schedule")
    assert schedule.source["step"] == 4
    assert all(layer.kind == "dit" for layer in schedule.layers)
    assert [int(v) for v in schedule.time_keys.values] == [750, 500, 250, 0]  # DiT's DDIM, leading spacing

    argv = [str(run), str(tmp_path / "out"), "--schedule", str(tmp_path / "schedule"), "--prompt", "3",
            "--seed", "0"]
    assert cli.sample(argv) == 0
    image = np.asarray(Image.open(tmp_path / "out" / "samples.png"))
    assert image.ndim == 3 and image.std() > 0

    loaded = load_run(run, consolidate=cli._zero_state_dict)
    assert type(loaded.model).__name__ == "DyDiTTransformer2DModel" and loaded.step == 4


@pytest.mark.slow
def test_dit_trains_on_pre_encoded_class_latents(tmp_path, tiny_model_dir):
    """`dydit-data encode` of .cls shards with a DiTPipeline folder → latents + labels, no text: one rank trains."""
    from data_tools.cli import main as data_main

    shards = _class_shards(tmp_path / "shards")
    encoded = tmp_path / "encoded"
    assert data_main(["encode", str(shards), str(encoded), "--model", tiny_model_dir("dit"), "--resolution", "16",
                      "--batch-size", "8"]) == 0
    train([f"model.path={tiny_model_dir('dit')}", f"data.shards={encoded}", f"run.output_dir={tmp_path}",
           "run.name=enc", "train.steps=2", "checkpoint.every_steps=2", "validation.every_steps=100",
           "data.workers=1", "dynamic.complete_warmup_steps=1"], recipe=RECIPE, timeout_s=300)
    rows = [row for row in metrics(tmp_path / "enc") if "loss" in row]
    assert [row["step"] for row in rows][-1] == 2 and all(math.isfinite(row["loss"]) for row in rows)


@pytest.mark.slow
def test_sit_trains_with_flow_matching_then_exports_flow_keys_and_samples(tmp_path, tiny_model_dir):
    """The sit family: the same recipe with model.family=sit on a SiTPipeline folder (flow-matching Euler)."""
    shards = _class_shards(tmp_path / "shards")
    train([f"model.path={tiny_model_dir('sit')}", "model.family=sit", f"data.shards={shards}",
           f"run.output_dir={tmp_path}", "run.name=sit", "train.steps=2", "checkpoint.every_steps=2",
           "validation.every_steps=2", "data.workers=1", "train.timestep_weighting=logit_normal"],
          recipe=RECIPE, timeout_s=300)
    run = tmp_path / "sit"
    rows = [row for row in metrics(run) if "loss" in row]
    assert rows[-1]["step"] == 2 and all(math.isfinite(row["loss"]) for row in rows)
    assert sorted((run / "samples").glob("*.png"))
    assert cli.export([str(run), str(tmp_path / "schedule"), "--steps", "3"]) == 0
    schedule = RouterSchedule.load(tmp_path / "schedule")
    assert schedule.time_keys.sampler["class"] == "FlowMatchEulerDiscreteScheduler"
    assert schedule.time_keys.values.tolist() == pytest.approx([1000.0, 500.5, 1.0])  # 1000·σ, σ from 1 to 1e-3
    assert cli.sample([str(run), str(tmp_path / "out"), "--schedule", str(tmp_path / "schedule"), "--prompt", "1",
                       "--seed", "0"]) == 0
    assert np.asarray(Image.open(tmp_path / "out" / "samples.png")).std() > 0
