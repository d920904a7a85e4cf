"""`save_transformer` writes a stock diffusers folder with the class's own `save_pretrained`: sharded
safetensors in the chosen dtype, weights in the base model's order, plain LoRA merged; TD-LoRA refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from infer_cases import FAMILIES, dynamic_model, model_inputs, time_keys

from safetensors.torch import load_file

from dydit_scale import export_schedule, full_width
from dydit_scale.infer.export import ratio_warning
from dydit_scale.infer.runs import save_transformer, stock_class
from dydit_scale.lora import apply_lora, lora_state_dict
from dydit_scale.lora.td_lora import apply_td_lora
from dydit_scale.models.tiny import tiny_transformer

_UNADAPTED = {"flux": "transformer_blocks.0.attn.add_v_proj.weight",
              "pixart": "transformer_blocks.0.attn1.to_v.weight",
              "latte": "temporal_transformer_blocks.0.attn1.to_k.weight",
              "dit": "transformer_blocks.1.attn1.to_v.weight", "sit": "transformer_blocks.1.attn1.to_v.weight"}


def _fine_tuned(family: str):
    model = dynamic_model(family, "all_on")
    apply_lora(model, targets=["to_q", "ff.net.0.proj"], rank=2, alpha=4.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tensor in lora_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_from_pretrained_computes_the_fine_tuned_model_from_sharded_files(tmp_path, family):
    model = _fine_tuned(family)
    save_transformer(model, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with diffusers' index
    assert not any("router" in k or "lora" in k for k in index["weight_map"])
    stock = stock_class(model).from_pretrained(tmp_path)
    assert type(stock) is stock_class(model)
    inputs = model_inputs(family, time_keys(family)[1])
    with torch.no_grad(), full_width(model):
        expected = model(**inputs).sample
        actual = stock(**inputs).sample
    assert (actual - expected).norm() / expected.norm() <= 1e-5
    base, permuted = tiny_transformer(family).state_dict()[_UNADAPTED[family]], model.state_dict()[_UNADAPTED[family]]
    assert not torch.equal(base, permuted), "the test needs a permuted weight"
    assert torch.equal(stock.state_dict()[_UNADAPTED[family]], base)  # back in the base model's order


def test_dtype_is_the_one_asked_for(tmp_path):
    save_transformer(_fine_tuned("pixart"), tmp_path, dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(tmp_path / "diffusion_pytorch_model.safetensors").values()} == {torch.bfloat16}
    stock = stock_class(tiny_transformer("pixart")).from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in stock.parameters()} == {torch.bfloat16}


def test_td_lora_cannot_be_merged_and_says_what_works(tmp_path):
    model = dynamic_model("flux", "all_on")
    apply_td_lora(model, targets=["to_q"], rank=2, alpha=2.0, experts=2, cond_dim=32,
                  block_prefixes=["transformer_blocks.0"])
    with pytest.raises(ValueError, match=r"depends on the timestep.*dydit-sample.*dydit_scale.load_run") as err:
        save_transformer(model, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_ratio_warning_fires_only_past_the_tolerance():
    schedule = export_schedule(dynamic_model("pixart", "random"), time_keys("pixart"))
    ratio = float(schedule.flops_ratio.mean())
    assert ratio_warning(dataclasses.replace(schedule, target_flops_ratio=ratio - 0.02)) is None
    line = ratio_warning(dataclasses.replace(schedule, target_flops_ratio=ratio - 0.05))
    assert line and f"{ratio:.3f}" in line and "+0.050" in line and "token routers" not in line
    with_tokens = dataclasses.replace(schedule, target_flops_ratio=ratio + 0.05, source={"token_routers": True})
    assert "-0.050" in ratio_warning(with_tokens) and "token routers skip more" in ratio_warning(with_tokens)
