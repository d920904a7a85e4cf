"""Every shipped recipe validates and says how to launch it (torchtune test_configs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dydit_scale.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert "tiny_cpu" in names and len(names) >= 7


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    load_recipe(path)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_opens_with_its_launch_command(path):
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#") and f"recipes/{path.name}" in header


def test_recipes_cover_every_family_with_full_and_td_lora_on_zero2_and_zero3():
    seen = set()
    for path in RECIPES:
        recipe = load_recipe(path)
        seen.add((recipe.model.family, recipe.lora.kind, recipe.train.zero_stage))
    for family in ("flux", "pixart", "latte"):
        assert {kind for f, kind, _ in seen if f == family} >= {"none", "td_lora"}
    assert {stage for *_, stage in seen} >= {2, 3}
    assert any(load_recipe(p).train.offload_optimizer for p in RECIPES)
