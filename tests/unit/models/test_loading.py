"""A user's local diffusers folder loads offline; a wrong path says what was expected, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dydit_scale.models.loading import ModelFolderError, detect_family, load_pipeline, load_transformer


@pytest.mark.parametrize("family", ["flux", "pixart", "latte", "dit", "sit"])
def test_pipeline_folder_and_transformer_folder_both_load(tiny_model_dir, family):
    folder = Path(tiny_model_dir(family))
    whole = load_transformer(folder, family)
    bare = load_transformer(folder / "transformer")
    assert type(whole) is type(bare)
    assert detect_family(folder) == family
    assert load_pipeline(folder).transformer.__class__ is type(whole)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelFolderError) as err:
        load_transformer(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in _one_line(err) and "no such folder" in str(err.value)


def test_folder_that_is_not_diffusers_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelFolderError) as err:
        load_transformer(tmp_path)
    assert "not a diffusers folder" in _one_line(err)


def test_unsupported_class_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelFolderError) as err:
        load_transformer(tmp_path)
    assert "UNet2DConditionModel" in _one_line(err) and "FluxTransformer2DModel" in str(err.value)


def test_family_mismatch_names_the_recipe_field(tiny_model_dir):
    with pytest.raises(ModelFolderError) as err:
        load_transformer(tiny_model_dir("pixart"), "flux")
    assert "model.family" in _one_line(err)
