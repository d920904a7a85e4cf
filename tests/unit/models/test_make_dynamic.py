"""make_dynamic: a fresh dynamic model is the stock diffusers model; keys, permutations, errors, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from dynamic_cases import FAMILIES, FULL_AT_INIT, model_inputs, set_router_bias, stock_and_dynamic
from torch import nn

from dydit_scale import flops_ratio, full_width, make_dynamic
from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic import flops
from dydit_scale.dynamic.routers import Router
from dydit_scale.models.tiny import tiny_transformer

ATOL = 1e-5  # fp32; permuting heads/channels only reorders sums


def _run(model: nn.Module, family: str, **kw) -> torch.Tensor:
    return model(**model_inputs(family, **kw)).sample


@pytest.mark.parametrize("mode", ["eval", "train", "full_width"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_matches_diffusers(family, mode):
    stock, dynamic = stock_and_dynamic(family)
    stock.train(mode == "train")
    dynamic.train(mode == "train")
    with torch.no_grad():
        expected = _run(stock, family)
        if mode == "full_width":
            with full_width(dynamic):
                got = _run(dynamic, family)
        else:
            got = _run(dynamic, family)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["pixart", "latte"])
def test_fresh_model_keeps_every_token_with_large_activations(family):
    """Token routers start from logit = bias whatever the residual-stream scale."""
    stock, dynamic = stock_and_dynamic(family)
    with torch.no_grad():
        expected, got = _run(stock, family, scale=300.0), _run(dynamic, family, scale=300.0)
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_keeps_diffusers_keys_and_new_parameters_are_routers(family):
    stock, dynamic = stock_and_dynamic(family)
    stock_keys, dyn_keys = set(stock.state_dict()), set(dynamic.state_dict())
    assert stock_keys <= dyn_keys
    assert all("router" in key for key in dyn_keys - stock_keys) and dyn_keys - stock_keys
    assert isinstance(dynamic, type(stock)) and dynamic.config == stock.config


def _l1_head_scores(parts_rows, parts_cols, heads):
    score = sum(w.reshape(heads, -1).abs().sum(1) for w in parts_rows)
    return score + sum(w.t().reshape(heads, -1).abs().sum(1) for w in parts_cols)


def test_flux_joint_heads_and_fused_proj_out_are_ranked_and_permuted():
    stock, dynamic = stock_and_dynamic("flux")
    heads, hd, width = 4, 16, 64
    double, dyn_double = stock.transformer_blocks[0].attn, dynamic.transformer_blocks[0].attn
    rows = [getattr(double, n).weight for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")]
    scores = _l1_head_scores(rows, [double.to_out[0].weight, double.to_add_out.weight], heads)
    perm = torch.argsort(scores, descending=True)
    assert not torch.equal(perm, torch.arange(heads))  # it actually reorders
    torch.testing.assert_close(dynamic.dydit_permutations["transformer_blocks.0.heads"], perm, rtol=0, atol=0)
    by_head = double.add_k_proj.weight.reshape(heads, hd, -1)[perm].reshape(width, -1)
    torch.testing.assert_close(dyn_double.add_k_proj.weight, by_head, rtol=0, atol=0)

    single, dyn_single = stock.single_transformer_blocks[1], dynamic.single_transformer_blocks[1]
    hidden = single.proj_mlp.out_features
    mlp_scores = single.proj_mlp.weight.abs().sum(1) + single.proj_out.weight[:, width:].abs().sum(0)
    mlp_perm = torch.argsort(mlp_scores, descending=True)
    torch.testing.assert_close(dynamic.dydit_permutations["single_transformer_blocks.1.mlp"], mlp_perm, rtol=0, atol=0)
    torch.testing.assert_close(dyn_single.proj_out.weight[:, width:], single.proj_out.weight[:, width:][:, mlp_perm])
    head_perm = dynamic.dydit_permutations["single_transformer_blocks.1.heads"]
    attn_cols = single.proj_out.weight[:, :width].reshape(width, heads, hd)[:, head_perm].reshape(width, width)
    torch.testing.assert_close(dyn_single.proj_out.weight[:, :width], attn_cols, rtol=0, atol=0)
    assert hidden == 4 * width


@pytest.mark.parametrize("family", FAMILIES)
def test_permuted_scores_are_descending(family):
    _, dynamic = stock_and_dynamic(family, DynamicConfig(flux_token_router_bias=35.0, importance_norm="l2"))
    for name, block in dynamic.named_modules():
        ff = getattr(block, "ff", None)
        if ff is None or not hasattr(block, "mlp_router"):
            continue
        fc1, fc2 = ff.net[0].proj.weight, ff.net[2].weight
        scores = fc1.norm(dim=1) + fc2.norm(dim=0)
        assert (scores[:-1] >= scores[1:] - 1e-6).all(), name
        assert not torch.equal(dynamic.dydit_permutations[f"{name}.mlp"], torch.arange(fc1.shape[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_router_from_diffusion_and_flops_loss(family):
    _, dynamic = stock_and_dynamic(family)
    dynamic.train()
    with torch.no_grad():  # token-router output weights start at 0, which blocks the layers before them
        for name, param in dynamic.named_parameters():
            if name.endswith(("token_router.fc2.weight", "token_router.score.weight")):
                param.normal_(0, 0.01)
    routers = {n: p for n, p in dynamic.named_parameters() if "router" in n}
    for loss_of in (lambda out: out.square().mean(), lambda out: flops_ratio(dynamic).mean()):
        dynamic.zero_grad()
        loss_of(_run(dynamic, family)).backward()
        assert not [n for n, p in routers.items() if p.grad is None or not p.grad.abs().sum() > 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_ratio_counts_active_heads_groups_and_tokens(family):
    """All routers off (logit −50, eval): 1 head, 1 group, 0 routed image tokens per block."""
    _, dynamic = stock_and_dynamic(family)
    set_router_bias(dynamic, -50.0)
    with torch.no_grad():
        _run(dynamic, family)
    ratio = flops_ratio(dynamic)
    c, h, hd = (64, 4, 16) if family == "flux" else (32, 4, 8)
    shape = dict(width=c, head_dim=hd, heads=h)
    if family == "flux":
        dyn = 2 * flops.flux_double_block_macs(image_tokens=16, text_tokens=5, **shape, active_heads=1,
                                               image_group_fraction=0.25, active_image_tokens=0)
        dyn += 2 * flops.flux_single_block_macs(image_tokens=16, text_tokens=5, **shape, active_heads=1,
                                                group_fraction=0.25, active_image_tokens=0)
        full = 2 * flops.flux_double_block_macs(image_tokens=16, text_tokens=5, **shape)
        full += 2 * flops.flux_single_block_macs(image_tokens=16, text_tokens=5, **shape)
    elif family in ("pixart", "dit", "sit"):  # a DiT block has no cross-attention
        kw = dict(tokens=16, context_tokens=5 if family == "pixart" else 0, **shape)
        dyn = 2 * flops.pixart_block_macs(**kw, active_heads=1, group_fraction=0.25, active_tokens=0)
        full = 2 * flops.pixart_block_macs(**kw)
    else:
        kw = dict(frames=4, tokens_per_frame=16, **shape)
        least = dict(active_heads=1, group_fraction=0.25, active_tokens=0)
        dyn = 2 * flops.latte_spatial_block_macs(**kw, context_tokens=5, **least)
        dyn += 2 * flops.latte_temporal_block_macs(**kw, **least)
        full = 2 * flops.latte_spatial_block_macs(**kw, context_tokens=5)
        full += 2 * flops.latte_temporal_block_macs(**kw)
    torch.testing.assert_close(ratio, torch.full((2,), dyn / full), rtol=1e-6, atol=0)
    assert ratio.shape == (2,) and ratio.max() < 0.5


def test_latte_temporal_blocks_that_did_not_run_count_nothing():
    _, dynamic = stock_and_dynamic("latte")
    with torch.no_grad():
        dynamic(**model_inputs("latte"), enable_temporal_attentions=False)
    torch.testing.assert_close(flops_ratio(dynamic), torch.ones(2))
    assert dynamic.temporal_transformer_blocks[0].last_macs()[1] == 0.0


def test_dynamic_cross_attention_and_text_mlp_are_routed():
    _, pixart = stock_and_dynamic("pixart", DynamicConfig(cross_attention=True))
    _, flux = stock_and_dynamic("flux", DynamicConfig(text_mlp=True, flux_token_router_bias=35.0))
    assert "transformer_blocks.0.cross_heads" in pixart.dydit_permutations
    assert "transformer_blocks.0.text_mlp" in flux.dydit_permutations
    for family, model in (("pixart", pixart), ("flux", flux)):
        set_router_bias(model, -50.0)
        with torch.no_grad():
            _run(model, family)
        reduced = flops_ratio(model)
        with full_width(model), torch.no_grad():
            _run(model, family)
        assert (reduced < flops_ratio(model)).all()


def test_unsupported_model_is_a_one_line_error():
    with pytest.raises(TypeError) as err:
        make_dynamic(nn.Linear(2, 2))
    message = str(err.value)
    assert "\n" not in message
    names = ("FluxTransformer2DModel", "PixArtTransformer2DModel", "LatteTransformer3DModel", "Linear")
    assert all(name in message for name in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_indivisible_mlp_groups_is_a_one_line_error_and_leaves_the_model_alone(family):
    stock = tiny_transformer(family)
    before = copy.deepcopy(stock.state_dict())
    with pytest.raises(ValueError) as err:
        make_dynamic(stock, DynamicConfig(mlp_groups=3))
    message = str(err.value)
    hidden = "256" if family == "flux" else "128"
    assert "\n" not in message and "dynamic.mlp_groups" in message and hidden in message and "3" in message
    assert all(torch.equal(before[k], v) for k, v in stock.state_dict().items())
    assert not any(isinstance(m, Router) for m in stock.modules())


def test_fused_projections_are_rejected_with_the_fix():
    stock = tiny_transformer("flux")
    stock.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        make_dynamic(stock, FULL_AT_INIT)


def test_mlp_groups_option_sets_group_count():
    _, dynamic = stock_and_dynamic("pixart", DynamicConfig(mlp_groups=8))
    block = dynamic.transformer_blocks[0]
    assert block.groups == 8 and block.mlp_router.proj.out_features == 7 and block.head_router.proj.out_features == 3


def test_flux_attention_mask_matches_diffusers():
    stock, dynamic = stock_and_dynamic("flux")
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[0, 3:5] = False  # two padded text tokens in sample 0
    kwargs = dict(model_inputs("flux"), joint_attention_kwargs={"attention_mask": mask})
    with torch.no_grad():
        torch.testing.assert_close(dynamic(**kwargs).sample, stock(**kwargs).sample, atol=ATOL, rtol=0)


def test_flux_token_routing_ignores_padded_text_given_the_attention_mask():
    """With the padding masked out of attention, padded text cannot change any image token (the token
    router's text mean skips padding too)."""
    _, dynamic = stock_and_dynamic("flux")
    set_router_bias(dynamic, 15.0)
    with torch.no_grad():
        for name, param in dynamic.named_parameters():
            if name.endswith("token_router.score.weight"):
                param.normal_(0, 3.0)
            elif name.endswith("token_router.score.bias"):
                param.zero_()
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[:, 3:5] = False
    inputs = dict(model_inputs("flux"), joint_attention_kwargs={"attention_mask": mask})
    noisy = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    noisy["encoder_hidden_states"][:, 3:5] = 50 * torch.randn(2, 2, 32)
    with torch.no_grad():
        clean_out, noisy_out = dynamic(**inputs).sample, dynamic(**noisy).sample
        kept = flops_ratio(dynamic)
    assert kept.max() < 1  # tokens really are being skipped
    torch.testing.assert_close(noisy_out, clean_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_can_be_deep_copied_after_a_training_forward(family):
    """EMA copies are taken from live models; per-forward masks carry graphs and are left out."""
    _, dynamic = stock_and_dynamic(family)
    dynamic.train()
    _run(dynamic, family)
    twin = copy.deepcopy(dynamic).eval()
    dynamic.eval()
    with torch.no_grad():
        torch.testing.assert_close(_run(twin, family), _run(dynamic, family), rtol=0, atol=0)


def test_default_flux_config_is_full_width_in_eval_and_in_training():
    """The default DyFLUX token-router bias (35) keeps every token of a fresh model, even with noise."""
    stock, dynamic = stock_and_dynamic("flux", DynamicConfig())
    with torch.no_grad():
        torch.testing.assert_close(_run(dynamic, "flux"), _run(stock, "flux"), atol=ATOL, rtol=0)
        dynamic.train()
        torch.testing.assert_close(_run(dynamic, "flux"), _run(stock, "flux"), atol=ATOL, rtol=0)


def test_official_flux_token_bias_keeps_sigmoid_of_bias_in_training():
    """flux_token_router_bias 5 (official DyFLUX): every token in eval; in training each kept w.p. σ(5) ≈ 0.993."""
    stock, dynamic = stock_and_dynamic("flux", DynamicConfig(flux_token_router_bias=5.0))
    with torch.no_grad():
        torch.testing.assert_close(_run(dynamic, "flux"), _run(stock, "flux"), atol=ATOL, rtol=0)
        dynamic.train()
        _run(dynamic, "flux", batch=256)
    kept = torch.stack([b.token_router.decision.mean() for b in dynamic.transformer_blocks])
    torch.testing.assert_close(kept.mean(), torch.sigmoid(torch.tensor(5.0)), atol=0.003, rtol=0)
