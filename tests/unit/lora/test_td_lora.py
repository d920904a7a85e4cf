"""TD-LoRA: identity at init, per-sample gate, per-step merge, file round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from dydit_scale.dynamic.routers import broadcast_timestep
from dydit_scale.lora import (
    TDLoRALinear,
    apply_td_lora,
    load_td_lora,
    save_td_lora,
    td_lora_layers,
    td_lora_state_dict,
)
from dydit_scale.lora.td_lora import TimestepGate
from dydit_scale.models.tiny import tiny_transformer
from lora_cases import BLOCKS, TARGETS

COND_DIM = 64  # any width: the real e_t comes from the dynamic model


_ROWS, _COLS = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
_IMG_IDS = torch.stack([torch.zeros(16), _ROWS.flatten(), _COLS.flatten()], dim=-1)  # [h·w, 3]


def _inputs(family: str, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "flux":
        return dict(hidden_states=torch.randn(batch, 16, 16, generator=g),
                    encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                    pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), 0.5),
                    img_ids=_IMG_IDS,
                    txt_ids=torch.zeros(5, 3), guidance=torch.full((batch,), 3.5))
    if family == "pixart":
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 5, 32, generator=g), timestep=torch.full((batch,), 500),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(hidden_states=torch.randn(batch, 4, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=g), timestep=torch.full((batch,), 500))


def _adapted(family: str, rank: int = 8, experts: int = 4, alpha: float = 4.0) -> nn.Module:
    model = tiny_transformer(family)
    apply_td_lora(model, targets=TARGETS[family], rank=rank, alpha=alpha, experts=experts, cond_dim=COND_DIM,
                  block_prefixes=BLOCKS[family])
    return model


def _randomise_adapter(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in td_lora_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)


def _run(model: nn.Module, family: str, e_t: torch.Tensor | None = None, **kw) -> torch.Tensor:
    inputs = _inputs(family, **kw)
    if e_t is not None:
        broadcast_timestep(model, e_t)  # what a dynamic model's forward does with its e_t
    return model(**inputs).sample


@pytest.mark.parametrize("family", ["flux", "pixart", "latte"])
def test_td_lora_output_equals_base_model_at_init(family):
    base, adapted = tiny_transformer(family), _adapted(family)
    with torch.no_grad():
        expected = _run(base, family)
        got = _run(adapted, family, e_t=torch.randn(2, COND_DIM))
    assert torch.equal(got, expected)  # B = 0 → the side path adds exact zeros


def test_only_adapter_parameters_train_and_base_keys_are_kept():
    base, adapted = tiny_transformer("pixart"), _adapted("pixart")
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or ".td_gate." in n for n in trainable)
    sd = adapted.state_dict()
    for key, tensor in base.state_dict().items():  # base checkpoints stay loadable; nothing renamed
        assert torch.equal(sd[key], tensor), key
    gate_keys = [k for k in sd if ".td_gate." in k]
    assert sorted(gate_keys) == sorted(f"{b}.td_gate.{p}" for b in BLOCKS["pixart"] for p in ("weight", "bias"))
    assert len(sd) == len(set(sd))


def test_optimizer_step_on_lora_b_changes_output_and_reaches_the_gate():
    adapted = _adapted("pixart")
    before = _run(adapted, "pixart", e_t=torch.randn(2, COND_DIM)).detach()
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    broadcast_timestep(adapted, torch.randn(2, COND_DIM))
    adapted(**_inputs("pixart")).sample.square().mean().backward()
    b_grads = [m.lora_B.weight.grad for m in td_lora_layers(adapted).values()]
    assert all(g is not None for g in b_grads) and any(g.abs().sum() > 0 for g in b_grads)
    opt.step()
    opt.zero_grad()
    # second step: with B ≠ 0 the gate receives gradient too
    broadcast_timestep(adapted, torch.randn(2, COND_DIM))
    adapted(**_inputs("pixart")).sample.square().mean().backward()
    gate = adapted.transformer_blocks[0].td_gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    after = _run(adapted, "pixart", e_t=torch.randn(2, COND_DIM)).detach()
    assert (after - before).abs().max() > 1e-6


@pytest.mark.parametrize("family", ["flux", "pixart", "latte"])
def test_gate_is_per_sample(family):
    """A batch with two timesteps equals two one-sample forwards (also checks Latte's B·F / B·S rows)."""
    model = _adapted(family)
    _randomise_adapter(model)
    e_t = torch.randn(2, COND_DIM)
    with torch.no_grad():
        batched = _run(model, family, e_t=e_t)
        single = [_run(model, family, e_t=e_t[i:i + 1], batch=2)[i] for i in range(2)]
        same_t = _run(model, family, e_t=e_t[:1].expand(2, -1))
    torch.testing.assert_close(batched[0], single[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], single[1], atol=1e-5, rtol=1e-5)
    assert (batched[1] - same_t[1]).abs().max() > 1e-4  # another e_t → another gate → another output


def _layer(rank: int = 6, experts: int = 3, alpha: float = 5.0) -> TDLoRALinear:
    torch.manual_seed(0)
    gate = TimestepGate(COND_DIM, experts)
    layer = TDLoRALinear(nn.Linear(12, 10), gate, rank=rank, alpha=alpha, experts=experts)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        gate.weight.normal_()
        gate.bias.normal_()
    return layer


def test_merged_weight_equals_side_path_and_slices():
    layer = _layer()
    x = torch.randn(2, 7, 12)
    pi = layer.gate.set_timestep_embedding(torch.randn(2, COND_DIM))
    y = layer(x)
    merged = layer.merged_weight(pi)  # [B, out, in]
    torch.testing.assert_close(torch.einsum("boi,bni->bno", merged, x) + layer.bias, y, atol=1e-5, rtol=1e-5)
    for b in range(2):  # per-step merge (one t) then slice rows / columns, as the fast path does
        w = layer.merged_weight(pi[b])
        rows, cols = torch.tensor([0, 3, 4, 9]), torch.tensor([1, 2, 5, 6, 11])
        torch.testing.assert_close(F.linear(x[b], w[rows], layer.bias[rows]), y[b][:, rows], atol=1e-5, rtol=1e-5)
        x_masked = torch.zeros_like(x[b])
        x_masked[:, cols] = x[b][:, cols]
        layer.gate.pi = pi[b:b + 1]
        torch.testing.assert_close(F.linear(x[b][:, cols], w[:, cols], layer.bias), layer(x_masked),
                                   atol=1e-5, rtol=1e-5)


def test_scale_is_alpha_over_expert_rank_and_uniform_gate_is_plain_lora():
    layer = _layer(rank=6, experts=3, alpha=5.0)
    pi = torch.tensor([0.0, 1.0, 0.0])  # one-hot: expert 1 alone, scale α/r with r = 2
    a, b = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer.delta_weight(pi), 5.0 / 2 * b[:, 2:4] @ a[2:4])
    uniform = torch.full((3,), 1 / 3)  # uniform gate = plain LoRA of rank 6 with scale α/rank
    torch.testing.assert_close(layer.delta_weight(uniform), 5.0 / 6 * b @ a)


def test_forward_without_timestep_embedding_raises_naming_what_sets_it():
    model = _adapted("pixart")
    with pytest.raises(RuntimeError, match="prepare_step.*broadcast_timestep"):
        model(**_inputs("pixart"))


def test_gate_gradient_survives_non_reentrant_checkpointing():
    layer, x, e_t = _layer(), torch.randn(2, 7, 12), torch.randn(2, COND_DIM)
    grads = []
    for checkpointed in (False, True):
        layer.gate.weight.grad = None
        layer.gate.set_timestep_embedding(e_t)  # outside the checkpointed region, as the model does
        out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        out.square().sum().backward()
        grads.append(layer.gate.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_adapter_file_round_trip_into_fresh_base(tmp_path):
    model = _adapted("flux", rank=4, experts=2, alpha=3.0)
    _randomise_adapter(model)
    path = save_td_lora(model, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["format"] == "dydit_scale.td_lora" and meta["format_version"] == "1"
    assert (meta["rank"], meta["experts"], float(meta["alpha"]), meta["cond_dim"]) == ("4", "2", 3.0, str(COND_DIM))
    assert keys == set(td_lora_state_dict(model))
    fresh = tiny_transformer("flux")
    names = load_td_lora(fresh, path)  # applies the adapter from the header, then loads it
    assert sorted(names) == sorted(td_lora_layers(model))
    e_t = torch.randn(2, COND_DIM)
    with torch.no_grad():
        assert torch.equal(_run(fresh, "flux", e_t=e_t), _run(model, "flux", e_t=e_t))


def test_loading_into_a_differently_shaped_adapter_fails(tmp_path):
    path = save_td_lora(_adapted("pixart", rank=8, experts=4), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        load_td_lora(_adapted("pixart", rank=8, experts=2), path)


def test_unmatched_target_is_an_error_naming_it():
    model = tiny_transformer("pixart")
    with pytest.raises(ValueError, match=r"\['to_qq'\] matched no nn.Linear"):
        apply_td_lora(model, targets=["to_q", "to_qq"], rank=4, alpha=4, experts=2, cond_dim=COND_DIM,
                      block_prefixes=BLOCKS["pixart"])
    with pytest.raises(ValueError, match="proj_out"):  # the final layer is outside every block
        apply_td_lora(model, targets=["proj_out"], rank=4, alpha=4, experts=2, cond_dim=COND_DIM,
                      block_prefixes=BLOCKS["pixart"])
