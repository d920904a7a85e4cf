"""The Family records: what the rest of the system asks of each family holds for the real classes."""

from __future__ import annotations

import inspect

import pytest
import torch

from dydit_scale.models.loading import detect_family
from dydit_scale.models.registry import FAMILY_MODULES, all_families, family_of, get_family
from dydit_scale.models.tiny import tiny_pipeline, tiny_transformer

NAMES = list(FAMILY_MODULES)


def test_registry_names_match_records():
    assert [family.name for family in all_families()] == NAMES
    with pytest.raises(ValueError, match="model.family: expected one of flux, pixart, latte, dit, sit, got 'sd3'"):
        get_family("sd3")


@pytest.mark.parametrize("name", NAMES)
def test_family_of_finds_the_stock_class_and_its_name(name):
    family = get_family(name)  # dit and sit share a class: the first family of it is found
    first = next(f for f in all_families() if f.transformer_class is family.transformer_class)
    assert family_of(tiny_transformer(name)) is first
    assert family_of(family.transformer_class.__name__) is first
    assert family_of(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_kwargs_are_arguments_of_the_pipeline(name):
    family = get_family(name)
    kwargs = family.pipeline_kwargs(steps=2, height=32, width=32, guidance=3.0, text_tokens=16, frames=4)
    accepted = inspect.signature(family.pipeline_type().__call__).parameters
    assert set(kwargs) <= set(accepted), set(kwargs) - set(accepted)


@pytest.mark.parametrize("name", NAMES)
def test_training_inputs_run_the_stock_transformer(name):
    """encode_pixels → batch_conditioning → transformer_inputs → forward: the prediction has the latents' shape."""
    family, pipe = get_family(name), tiny_pipeline(name)
    frames = (4,) if family.video else ()
    pixels = torch.rand(2, 3, *frames, 32, 32) * 2 - 1
    latents = family.encode_pixels(pipe.vae, pixels)
    batch = {"pixels": pixels, "labels": torch.tensor([3, 7])} if family.name in ("dit", "sit") else \
        {"pixels": pixels, "captions": ["a red circle", "a blue square"]}
    text = family.batch_conditioning(pipe, batch, max_tokens=16, device=torch.device("cpu"))
    latent_hw = (pixels.shape[-2] // 2, pixels.shape[-1] // 2)  # the tiny VAE halves each side
    inputs = family.transformer_inputs(pipe.transformer, latents, torch.tensor([10, 500]), text,
                                       latent_hw=latent_hw, guidance=3.5)
    with torch.no_grad():
        out = pipe.transformer(**inputs).sample
    assert out.shape[0] == 2 and out.shape[2:] == latents.shape[2:]
    if family.objective == "flow":  # the velocity has the (packed) latents' shape; DDPM adds learned σ channels
        assert out.shape == latents.shape


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs_run_the_stock_transformer(name):
    family = get_family(name)
    model = tiny_transformer(name)
    inputs = family.example_inputs(model.config, batch=2, text_tokens=5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(**inputs, timestep=torch.tensor([0.5, 0.5]) if family.objective == "flow" else torch.tensor([3, 3]),
                    return_dict=False)[0]
    assert out.shape[0] == 2


@pytest.mark.parametrize("name", NAMES)
def test_a_saved_tiny_pipeline_is_detected_as_its_family(name, tmp_path):
    tiny_pipeline(name).save_pretrained(tmp_path, safe_serialization=True)
    assert detect_family(tmp_path) == name


@pytest.mark.parametrize("name", NAMES)
def test_batch_conditioning_refuses_the_other_kind_of_shards(name):
    """Captioned shards for a class-conditional family, or .cls shards for a text family: one line."""
    family, pipe = get_family(name), None
    if family.name in ("dit", "sit"):
        with pytest.raises(ValueError, match=r"class-conditional and needs shards with class labels \(\{key\}.cls"):
            family.batch_conditioning(pipe, {"pixels": None, "captions": ["x"]}, max_tokens=8, device=torch.device("cpu"))
        with pytest.raises(ValueError, match="class label 1000 is out of range"):
            family.batch_conditioning(pipe, {"labels": torch.tensor([1, 1000])}, max_tokens=8, device=torch.device("cpu"))
    else:
        with pytest.raises(ValueError, match=r"text-conditioned, but the shards hold class labels \(.cls\)"):
            family.batch_conditioning(pipe, {"labels": torch.tensor([1])}, max_tokens=8, device=torch.device("cpu"))
