"""Plain LoRA via peft: diffusers-format file that FluxPipeline and peft load back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from dydit_scale.lora import apply_lora, load_lora_diffusers, lora_state_dict, save_lora_diffusers
from dydit_scale.models.tiny import tiny_transformer
from lora_cases import BLOCKS, TARGETS

_ROWS, _COLS = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
_IMG_IDS = torch.stack([torch.zeros(16), _ROWS.flatten(), _COLS.flatten()], dim=-1)  # [h·w, 3]


def _inputs(family: str, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    text = dict(encoder_hidden_states=torch.randn(batch, 5, 32, generator=g))
    if family == "flux":
        return dict(hidden_states=torch.randn(batch, 16, 16, generator=g), **text,
                    pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), 0.5),
                    img_ids=_IMG_IDS, txt_ids=torch.zeros(5, 3), guidance=torch.full((batch,), 3.5))
    if family == "pixart":
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), **text, timestep=torch.full((batch,), 500),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(hidden_states=torch.randn(batch, 4, 4, 8, 8, generator=g), **text, timestep=torch.full((batch,), 500))


def _adapted(family: str, rank: int = 4, alpha: float = 12.0) -> nn.Module:
    model = tiny_transformer(family)
    apply_lora(model, targets=TARGETS[family], rank=rank, alpha=alpha, block_prefixes=BLOCKS[family])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained adapter: B ≠ 0 (peft initialises B = 0)
        for tensor in lora_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2)
    return model


def _out(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(family)).sample


def test_apply_lora_is_identity_at_init_and_trains_only_lora():
    base, model = tiny_transformer("pixart"), tiny_transformer("pixart")
    names = apply_lora(model, targets=TARGETS["pixart"], rank=4, alpha=4.0)
    assert len(names) == 2 * (8 + 2)  # per block: attn1 + attn2 q/k/v/out, ff fc1/fc2
    assert torch.equal(_out(model, "pixart"), _out(base, "pixart"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_flux_file_loads_in_flux_pipeline_with_identical_outputs(tmp_path):
    from diffusers import FluxPipeline

    model = _adapted("flux")
    expected = _out(model, "flux")
    assert (expected - _out(tiny_transformer("flux"), "flux")).abs().max() > 1e-4  # the adapter matters
    path = save_lora_diffusers(model, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert path.name == "pytorch_lora_weights.safetensors"
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 12.0
    fresh = tiny_transformer("flux")
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=fresh)
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(_out(fresh, "flux"), expected, atol=1e-6, rtol=0)  # alpha ≠ r survives


@pytest.mark.parametrize("family", ["pixart", "latte"])
def test_pixart_latte_file_loads_back_through_peft(tmp_path, family):
    model = _adapted(family)
    expected = _out(model, family)
    path = save_lora_diffusers(model, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    fresh = tiny_transformer(family)
    load_lora_diffusers(fresh, tmp_path)  # header → apply_lora → peft.set_peft_model_state_dict
    assert torch.equal(_out(fresh, family), expected)


def test_block_prefixes_keep_the_final_proj_out_static():
    model = tiny_transformer("flux")
    names = apply_lora(model, targets=["proj_out"], rank=2, alpha=2.0, block_prefixes=BLOCKS["flux"])
    assert names == ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]


def test_unmatched_target_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"\['ff.net.9'\] matched no nn.Linear"):
        apply_lora(tiny_transformer("latte"), targets=["to_q", "ff.net.9"], rank=2, alpha=2.0)
