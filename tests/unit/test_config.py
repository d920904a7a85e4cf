"""The recipe schema: every problem reported at once, one line each, in the user's key names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dydit_scale.config import Recipe, RecipeError, load_recipe, recipe_fields

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    """A recipe file of `text` plus the two required fields, model.path and data.shards (each unless
    `text` opens that section itself)."""
    path = tmp_path / "x.yaml"
    text = text.replace("{}\n", "")
    if not text.startswith("model:"):
        text = "model:\n  path: some/model\n" + text
    text = text.replace("data:\n", "data:\n  shards: some/shards\n") if "data:\n" in text else text + "data:\n  shards: some/shards\n"
    path.write_text(text)
    return path


def test_unknown_key_and_bad_value_are_both_reported_one_line_each(tmp_path):
    path = _write(tmp_path, "optim:\n  lrr: 1.0e-4\ndata:\n  batch_size: 0\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert sorted(err.value.lines) == sorted([
        f"{path}: optim.lrr: unknown field; did you mean optim.lr?",
        f"{path}: data.batch_size: expected an integer >= 1, got 0",
    ])


def test_override_is_parsed_as_yaml_and_applied_by_key_name(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 1.0e-4\n")
    recipe = load_recipe(path, ["optim.lr=5e-5", "train.zero_stage=3", "data.shards=[a.tar, b.tar]"])
    assert recipe.optim.lr == pytest.approx(5e-5)
    assert recipe.train.zero_stage == 3
    assert recipe.data.shards == ["a.tar", "b.tar"]


def test_override_of_unknown_key_names_the_closest_field(tmp_path):
    path = _write(tmp_path, "{}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["train.step=3"])
    assert err.value.lines == [f"{path}: train.step: unknown field; did you mean train.steps?"]


@pytest.mark.parametrize("override, message", [
    ("model.family=sdxl", "model.family: expected one of flux, pixart, latte, dit or sit, got 'sdxl'"),
    ("dynamic.target_flops_ratio=1.5", "dynamic.target_flops_ratio: expected a number <= 1.0, got 1.5"),
    ("lora.rank=10", "lora.rank (10) must be divisible by lora.groups (4) for td_lora"),
    ("train.offload_params=true", "train.offload_params needs train.zero_stage 3, got 2"),
    ("data.kind=video_text", "data.kind 'video_text' does not fit model.family 'flux'"),
    ("validation.cache.mode=fast", "validation.cache.mode: expected one of none, dbcache or taylorseer, got 'fast'"),
    ("validation.cache.threshold=0", "validation.cache.threshold: expected a number > 0.0, got 0"),
])
def test_bad_values_name_the_field_and_what_was_expected(tmp_path, override, message):
    path = _write(tmp_path, "{}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    assert len(err.value.lines) == 1
    assert err.value.lines[0].startswith(f"{path}: {message}")


def test_a_one_step_pixart_grid_is_refused_before_training(tmp_path):
    """PixArtAlphaPipeline runs a 1-step call as LCM (`scheduler.step(...)[1]`), which fails at the first grid."""
    path = _write(tmp_path, "{}\n")
    with pytest.raises(RecipeError, match="validation.inference_steps: PixArtAlphaPipeline takes 1 step for an LCM"):
        load_recipe(path, ["model.family=pixart", "validation.inference_steps=1"])
    assert load_recipe(path, ["model.family=flux", "validation.inference_steps=1"]).validation.inference_steps == 1


def test_missing_file_and_bad_yaml_are_one_line(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "run: [\n"))


def test_every_field_has_a_docstring():
    undocumented = [name for name, doc, _ in recipe_fields() if not doc.strip()]
    assert undocumented == []


def test_recipe_is_frozen():
    with pytest.raises(Exception):
        Recipe(model={"path": "m"}, data={"shards": "s"}).optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("text, missing", [
    ("model:\n  family: flux\ndata:\n  shards: s\n", ["model.path"]),
    ("model:\n  path: m\ndata:\n  batch_size: 2\n", ["data.shards"]),
    ("model:\n  path: m\n", ["data.shards"]),  # a whole section left out names its required field
    ("run:\n  name: x\n", ["model.path", "data.shards"]),
])
def test_model_path_and_data_shards_are_required_one_line_each(tmp_path, text, missing):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.lines == [f"{path}: {name}: required field missing" for name in missing]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from dydit_scale.cli import validate; sys.exit(validate())", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_validate_cli_exits_2_with_one_line_per_problem_and_no_traceback(tmp_path):
    path = _write(tmp_path, "optim:\n  lrr: 1\ndata:\n  batch_size: 0\n")
    result = _cli(str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 2


def test_validate_cli_does_not_import_torch():
    code = ("import sys; from dydit_scale.cli import validate; validate(['recipes/tiny_cpu.yaml', 'run.output_dir=/no/runs']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr


def test_validate_cli_print_and_explain():
    shown = _cli("recipes/tiny_cpu.yaml", "--offline", "--print")
    assert shown.returncode == 0 and "target_flops_ratio: 0.6" in shown.stdout
    explained = _cli("--explain")
    assert explained.returncode == 0 and "dynamic.target_flops_ratio" in explained.stdout
    assert "model.path (required)" in explained.stdout and "data.shards (required)" in explained.stdout


def test_explain_cites_no_document_that_does_not_ship():
    """Field docs say why in their own words; no pointers into specs, design notes or issue numbers."""
    explained = _cli("--explain")
    assert explained.returncode == 0
    assert "§" not in explained.stdout
    assert not re.search(r"\bspec\b", explained.stdout, flags=re.IGNORECASE), "cites a spec"
    assert not re.search(r"\bP\d\d\b|\bissue \d+", explained.stdout), "cites a P-code or an issue"
