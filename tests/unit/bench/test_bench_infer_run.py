"""`dydit-bench infer --run RUN --schedule DIR` times a converted DyDiT run under the schedule dydit-export
wrote for it: the static path is the stock class over the run's weights, the masked path the loaded run,
the fast path its schedule; the FLOPs ratios are the schedule's, and mismatched flags or schedules are
one-line errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

from dydit_scale import RouterSchedule, cli
from dydit_scale.bench import infer
from dydit_scale.bench.infer_run import build_run_paths, latent_grid, pick_steps
from dydit_scale.convert_cli import main as convert
from dydit_scale.dynamic.routers import full_width
from dydit_scale.dynamic.schedule import TokenShape
from dydit_scale.models.official_dit import OfficialArch

WIDTH, HEADS, PATCH, INPUT, IN_CH = 64, 4, 2, 8, 4
SCHEDULE_STEPS = 4


def _official_dydit(depth: int, seed: int) -> dict[str, torch.Tensor]:
    """A random DyDiT state dict in the original layout: routers with zero bias (units switch with t), and
    token routers biased to keep every token, so the measured FLOPs ratio is the schedule's width-only one."""
    arch = OfficialArch(depth=depth, width=WIDTH, heads=HEADS, patch=PATCH, in_channels=IN_CH, out_channels=2 * IN_CH,
                        input_size=INPUT, num_classes=1000, dynamic=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in arch.expected_shapes().items():
        router = "rate.router" in name or "mlp_head" in name
        state[name] = torch.randn(shape, generator=g) * (0.3 if router else 0.08)
        if router and name.endswith("bias"):
            state[name].zero_()
        if name.endswith("mlp_head.2.bias"):
            state[name].fill_(50.0)
    stock = DiTTransformer2DModel(**arch.transformer_config())
    state["pos_embed"] = stock.pos_embed.pos_embed.detach().clone()
    return state


def _converted(folder, depth: int, seed: int) -> tuple:
    """(run folder, schedule folder) of a converted DyDiT with an exported schedule."""
    torch.save({"ema": _official_dydit(depth, seed)}, folder / "dydit.pt")
    assert convert(["official-dydit", str(folder / "dydit.pt"), str(folder / "run")]) == 0
    assert cli.export([str(folder / "run"), str(folder / "schedule"), "--steps", str(SCHEDULE_STEPS)]) == 0
    return folder / "run", folder / "schedule"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two converted DyDiT runs: `a` with 2 blocks and `b` with 3, each with its schedule."""
    return {name: _converted(tmp_path_factory.mktemp(name), depth, seed)
            for name, depth, seed in (("a", 2, 0), ("b", 3, 1))}


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_converted_run_is_timed_under_its_schedule(runs, capsys):
    run, schedule = runs["a"]
    assert infer.run(_parse("--run", str(run), "--schedule", str(schedule), "--json", "--steps", "2",
                            "--repeats", "1", "--threads", "1", "--device", "cpu")) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["path"]: row for row in result["rows"]}
    assert list(rows) == ["static", "masked", "fast"]
    assert (result["run"], result["schedule"], result["family"]) == (str(run), str(schedule), "dit")
    assert "preset" not in result and result["steps"] == 2 and result["schedule_steps"] == SCHEDULE_STEPS
    assert result["batch"] == 2 and result["repeats"] == 1  # dit: one image under classifier-free guidance
    assert result["tokens"] == f"{INPUT * 8}²: {(INPUT // PATCH) ** 2} image tokens"  # the recipe's resolution
    loaded = RouterSchedule.load(schedule)
    want = float(loaded.flops_ratio[pick_steps(loaded, 2)].mean())
    assert result["schedule_flops_ratio"] == pytest.approx(want, abs=1e-12) and want < 1.0
    assert rows["static"]["flops_ratio"] == 1.0
    assert rows["fast"]["flops_ratio"] == pytest.approx(want, abs=1e-6)
    assert rows["masked"]["flops_ratio"] == pytest.approx(want, abs=1e-6)
    for row in rows.values():
        assert row["s_per_step"] > 0 and row["efficiency"] == row["speedup"] * row["flops_ratio"]
    assert result["max_abs_diff_fast_vs_masked"] < 1e-4
    assert result["goal_checks"]["fast_efficiency"]["goal"] == ">= 0.9"


def test_the_table_names_the_run_and_the_schedule(runs, capsys):
    run, schedule = runs["a"]
    assert infer.run(_parse("--run", str(run), "--schedule", str(schedule), "--steps", "1", "--repeats", "1",
                            "--threads", "1", "--device", "cpu")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {run} (dit, ") and f"schedule {schedule}: 1 of its {SCHEDULE_STEPS} steps" in out
    assert "fast-path efficiency" in out.splitlines()[-1]


def test_the_paths_share_one_copy_of_the_weights_and_static_is_the_stock_function(runs):
    run, schedule = runs["a"]
    bench = build_run_paths(run, schedule, steps=None, batch=None, seed=0, device=torch.device("cpu"),
                            dtype=torch.float32, attention="sdpa")
    static, masked, fast = bench.paths.values()
    assert type(static) is DiTTransformer2DModel and len(bench.steps) == SCHEDULE_STEPS
    weight = masked.transformer_blocks[0].attn1.to_q.weight
    assert static.transformer_blocks[0].attn1.to_q.weight is weight
    assert fast.transformer_blocks[0].attn1.to_q.weight is weight
    keys = RouterSchedule.load(schedule).time_keys.values
    assert torch.equal(torch.stack([step["timestep"][0] for step in bench.steps]), keys)
    with torch.no_grad(), full_width(masked):
        want = masked(**bench.steps[0])[0]
    with torch.no_grad():
        got = static(**bench.steps[0])[0]
    assert float((got - want).abs().max()) < 1e-4


def test_latent_grid_follows_the_token_shape_and_the_aspect():
    config = argparse.Namespace(patch_size=2)
    assert latent_grid("dit", config, TokenShape(16, 0), [64, 64]) == (8, 8)
    assert latent_grid("pixart", config, TokenShape(8, 120), [32, 64]) == (4, 8)
    assert latent_grid("flux", argparse.Namespace(patch_size=1), TokenShape(4096, 512), None) == (128, 128)


@pytest.mark.parametrize(("argv", "message"), [
    (("--run", "R"), "^--run and --schedule go together"),
    (("--schedule", "S"), "^--run and --schedule go together"),
    (("--run", "R", "--schedule", "S", "--preset", "tiny"), "^--run: .*drop --preset$"),
    (("--run", "R", "--schedule", "S", "--resolution", "512"), "^--run: .*drop --resolution$"),
])
def test_run_flags_that_do_not_fit_together_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit, match=message) as raised:
        infer.check_args(_parse("--device", "cpu", *argv))
    assert "\n" not in str(raised.value)


def test_a_schedule_of_another_run_is_a_one_line_error(runs):
    run, _ = runs["a"]
    _, other = runs["b"]
    with pytest.raises(SystemExit, match=r"^--schedule: .*routers do not match the model's") as raised:
        infer.measure(_parse("--run", str(run), "--schedule", str(other), "--steps", "1", "--repeats", "1",
                             "--threads", "1", "--device", "cpu"))
    assert "\n" not in str(raised.value)


def test_missing_folders_and_too_many_steps_are_one_line_errors(runs, tmp_path):
    run, schedule = runs["a"]
    cases = [((str(tmp_path), str(schedule)), "^--run: "), ((str(run), str(tmp_path)), "^--schedule: .*not a schedule"),
             ((str(run), str(schedule), "--steps", "9"), f"^--steps: the schedule holds {SCHEDULE_STEPS} steps")]
    for (run_arg, schedule_arg, *rest), message in cases:
        with pytest.raises(SystemExit, match=message) as raised:
            infer.measure(_parse("--run", run_arg, "--schedule", schedule_arg, *rest, "--device", "cpu"))
        assert "\n" not in str(raised.value)
