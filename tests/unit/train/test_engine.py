"""Parameter groups (routers found by type) and the LR schedule (diffusers' `get_scheduler`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dydit_scale import make_dynamic
from dydit_scale.config import DynamicConfig, RecipeError, load_recipe, recipe_choices
from dydit_scale.dynamic.routers import router_parameters
from dydit_scale.models.tiny import tiny_transformer
from dydit_scale.train.engine import LR_SCHEDULES, build_lr_scheduler, parameter_groups

TINY = Path(__file__).resolve().parents[3] / "recipes" / "tiny_cpu.yaml"


def _recipe(*overrides: str):
    return load_recipe(TINY, ["model.path=unused", "data.shards=unused", *overrides])


def _lrs(recipe, steps: int) -> list[float]:
    """The LR of each optimizer step, as the trainer logs it (read before the step)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=recipe.optim.lr)
    scheduler = build_lr_scheduler(optimizer, recipe)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_every_schedule_the_recipe_accepts_is_a_diffusers_scheduler():
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULES) == set(recipe_choices()["optim.schedule"])
    assert {SchedulerType(name) for name in LR_SCHEDULES.values()}


def test_a_schedule_diffusers_lacks_is_refused_by_the_recipe_schema():
    with pytest.raises(RecipeError) as err:
        _recipe("optim.schedule=cosine_with_hard_restarts")
    assert len(err.value.lines) == 1 and "optim.schedule: expected one of constant, cosine or linear" in err.value.lines[0]


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466]),
])
def test_warm_up_then_the_schedule_over_train_steps(schedule, expected):
    recipe = _recipe(f"optim.schedule={schedule}", "optim.warmup_steps=2", "train.steps=6", "optim.lr=1.0")
    assert _lrs(recipe, 6) == pytest.approx(expected)


def test_no_warm_up_starts_at_the_peak():
    assert _lrs(_recipe("optim.warmup_steps=0", "optim.lr=0.1"), 3) == pytest.approx([0.1, 0.1, 0.1])


def test_router_group_holds_exactly_the_router_parameters_and_scales_their_lr():
    model = make_dynamic(tiny_transformer("pixart"), DynamicConfig())
    model.extra = nn.Module()
    model.extra.router = nn.Linear(2, 2)  # a user layer named "router" is not a Router
    recipe = _recipe("optim.lr=0.01", "dynamic.router_lr_scale=30")
    groups = {group["name"]: group for group in parameter_groups(model, recipe)}
    routers = {id(p) for p in router_parameters(model).values()}
    assert routers and {id(p) for p in groups["routers"]["params"]} == routers
    assert id(model.extra.router.weight) in {id(p) for p in groups["weights"]["params"]}
    assert groups["routers"]["lr"] == pytest.approx(0.3) and groups["weights"]["lr"] == pytest.approx(0.01)
    total = sum(len(group["params"]) for group in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_frozen_parameters_stay_out_of_every_group():
    model = make_dynamic(tiny_transformer("pixart"), DynamicConfig())
    for name, param in model.named_parameters():
        param.requires_grad_(name in router_parameters(model))
    groups = parameter_groups(model, _recipe())
    assert [group["name"] for group in groups] == ["routers"]  # an empty weights group is dropped
