"""LoRA files of a dynamic (permuted) model are written in the base model's order: the stock model +
the file computes the fine-tuned dynamic model at full width, and the file loads back exactly."""

from __future__ import annotations

import pytest
import torch
from lora_cases import BLOCKS, TARGETS
from safetensors.torch import load_file

from dydit_scale import full_width, make_dynamic
from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.importance import reorder_state_dict
from dydit_scale.lora import apply_lora, load_lora_diffusers, lora_state_dict, save_lora_diffusers
from dydit_scale.models.tiny import tiny_transformer
from test_plain_lora import _inputs


def _trained_dynamic(family: str):
    model = make_dynamic(tiny_transformer(family), DynamicConfig(text_mlp=family == "flux"))
    moved = [k for k, p in model.dydit_permutations.items() if not torch.equal(p, torch.arange(p.numel()))]
    assert len(moved) >= len(model.dydit_permutations) // 2, "the test needs permutations that are not the identity"
    apply_lora(model, targets=TARGETS[family], rank=4, alpha=12.0, block_prefixes=BLOCKS[family])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in lora_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2)
    return model.eval()


def _full_width_out(model, family: str) -> torch.Tensor:
    with torch.no_grad(), full_width(model):
        return model(**_inputs(family)).sample


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rel = (actual - expected).norm() / expected.norm()
    assert rel <= 1e-4, f"relative difference {rel:.2e}"


def test_flux_file_in_the_stock_pipeline_computes_the_fine_tuned_model(tmp_path):
    from diffusers import FluxPipeline

    model = _trained_dynamic("flux")
    expected = _full_width_out(model, "flux")
    stock = tiny_transformer("flux")
    assert (expected - stock(**_inputs("flux")).sample).abs().max() > 1e-3  # the adapter matters
    save_lora_diffusers(model, tmp_path)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=stock)
    pipe.load_lora_weights(tmp_path)
    with torch.no_grad():
        _close(stock(**_inputs("flux")).sample, expected)


@pytest.mark.parametrize("family", ["pixart", "latte"])
def test_pixart_latte_file_on_the_stock_model_computes_the_fine_tuned_model(tmp_path, family):
    model = _trained_dynamic(family)
    expected = _full_width_out(model, family)
    save_lora_diffusers(model, tmp_path)
    stock = tiny_transformer(family)
    load_lora_diffusers(stock, tmp_path)  # no permutation on a stock model: the file is in its order
    with torch.no_grad():
        _close(stock(**_inputs(family)).sample, expected)


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_file_loads_back_into_a_fresh_dynamic_model_exactly(tmp_path, family):
    model = _trained_dynamic(family)
    save_lora_diffusers(model, tmp_path)
    file = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    own = lora_state_dict(model)
    differs = [k for k in own if not torch.equal(file[f"transformer.{k}"], own[k])]
    assert differs, "the file holds the permuted order"
    fresh = make_dynamic(tiny_transformer(family), DynamicConfig(text_mlp=family == "flux"))
    load_lora_diffusers(fresh, tmp_path)
    for key, tensor in lora_state_dict(fresh).items():
        assert torch.equal(tensor, own[key]), key


def test_reorder_round_trip_moves_weights_bias_and_lora_factors():
    model = make_dynamic(tiny_transformer("flux"))
    state = {k: v.clone() for k, v in model.state_dict().items() if "router" not in k}
    base = reorder_state_dict(state, model.dydit_spans, to_base=True)
    stock = tiny_transformer("flux").state_dict()
    for key, tensor in base.items():
        assert torch.equal(tensor, stock[key]), key  # fused single-block proj_out columns included
    back = reorder_state_dict(base, model.dydit_spans, to_base=False)
    assert all(torch.equal(back[k], state[k]) for k in state)
