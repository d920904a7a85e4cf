"""The static pruning baseline: near-uniform plans at a target FLOPs ratio, magnitude-ranked removal, and
analytic MACs that match the shapes of the pruned model and torch's FLOP counter."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dydit_scale.bench.efficacy_prune import PrunePlan, plan_pruning, prune_static, pruned_macs_ratio
from dydit_scale.dynamic import flops

HEADS, HEAD_DIM, LAYERS, SIZE, PATCH, TEXT, CAPTION = 8, 4, 2, 16, 4, 5, 8
TOKENS = dict(image_tokens=(SIZE // PATCH) ** 2, text_tokens=TEXT)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0) -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=3, out_channels=6, num_layers=LAYERS,
        cross_attention_dim=HEADS * HEAD_DIM, sample_size=SIZE, patch_size=PATCH, norm_num_groups=1,
        caption_channels=CAPTION, use_additional_conditions=False, norm_type="ada_norm_single").eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _model()


def _inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 3, SIZE, SIZE, generator=g), timestep=torch.tensor([100.0, 700.0]),
                encoder_hidden_states=torch.randn(2, TEXT, CAPTION, generator=g),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


@torch.no_grad()
def _forward(model: torch.nn.Module) -> torch.Tensor:
    return model(**_inputs())[0]


def _unit_share(model: torch.nn.Module) -> float:
    """The largest MACs share of one head or one MLP group of one block."""
    kw = dict(tokens=TOKENS["image_tokens"], context_tokens=TEXT, width=HEADS * HEAD_DIM, head_dim=HEAD_DIM,
              heads=HEADS)
    full = LAYERS * flops.pixart_block_macs(**kw)
    head = flops.self_attention_macs(tokens=TOKENS["image_tokens"], width=HEADS * HEAD_DIM, head_dim=HEAD_DIM,
                                     heads=HEADS, active_heads=1)
    group = flops.mlp_macs(width=HEADS * HEAD_DIM, hidden=4 * HEADS * HEAD_DIM, tokens=TOKENS["image_tokens"],
                           group_fraction=1 / HEADS)
    return max(head, group) / full


def test_plan_full_half_monotone_and_range(model) -> None:
    full = plan_pruning(model, 1.0, **TOKENS)
    assert full == PrunePlan((HEADS,) * LAYERS, (HEADS,) * LAYERS, HEADS, HEADS, 1.0)
    assert json.loads(json.dumps(full.to_json()))["heads"] == [HEADS] * LAYERS

    half = plan_pruning(model, 0.5, **TOKENS)
    assert abs(half.flops_ratio - 0.5) <= _unit_share(model)
    assert max(half.heads) - min(half.heads) <= 1 and max(half.groups) - min(half.groups) <= 1
    assert abs(half.heads[0] / HEADS - half.groups[0] / HEADS) <= 2 / HEADS  # heads and MLP pruned alike

    targets = [0.01 * k for k in range(1, 101)]
    ratios = [plan_pruning(model, t, **TOKENS).flops_ratio for t in targets]
    assert all(a <= b for a, b in zip(ratios, ratios[1:]))
    floor = plan_pruning(model, 0.01, **TOKENS)
    assert floor.heads == (1,) * LAYERS and floor.groups == (1,) * LAYERS and ratios[0] == floor.flops_ratio

    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            plan_pruning(model, bad, **TOKENS)


def test_prune_keeps_function_at_full_width_and_matches_the_plan() -> None:
    original = _model()
    reference = _forward(original)
    kept_all = prune_static(_model(), plan_pruning(original, 1.0, **TOKENS))
    assert torch.allclose(_forward(kept_all), reference, atol=1e-6, rtol=0)

    plan = plan_pruning(original, 0.6, **TOKENS)
    pruned = prune_static(_model(), plan)
    out = _forward(pruned)
    assert out.shape == reference.shape and not torch.allclose(out, reference, atol=1e-3)
    assert abs(pruned_macs_ratio(pruned, **TOKENS) - plan.flops_ratio) <= 1e-9
    block = pruned.transformer_blocks[0]
    assert block.attn1.heads == plan.heads[0] and block.attn1.to_q.out_features == plan.heads[0] * HEAD_DIM
    assert block.ff.net[2].in_features == plan.groups[0] * 4 * HEAD_DIM
    assert all(p.requires_grad for p in pruned.parameters())


def test_removes_the_lowest_magnitude_head_and_group() -> None:
    model = _model()
    attn, ff = model.transformer_blocks[0].attn1, model.transformer_blocks[0].ff
    rows = slice(3 * HEAD_DIM, 4 * HEAD_DIM)
    channels = slice(5 * 16, 6 * 16)  # D / G = 128 / 8 channels, anywhere in the MLP
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_k, attn.to_v):
            linear.weight[rows] = 0
            linear.bias[rows] = 0
        attn.to_out[0].weight[:, rows] = 0
        ff.net[0].proj.weight[channels] = 0
        ff.net[0].proj.bias[channels] = 0
        ff.net[2].weight[:, channels] = 0
    reference = _forward(model)
    plan = PrunePlan((HEADS - 1, HEADS), (HEADS - 1, HEADS), HEADS, HEADS, 0.0)
    prune_static(model, plan)
    assert model.transformer_blocks[0].attn1.heads == HEADS - 1
    assert torch.allclose(_forward(model), reference, atol=1e-6, rtol=0)


def _block_flops(model: torch.nn.Module) -> int:
    """Matmul FLOPs of the transformer blocks only (attention cores as bmm on the math backend)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        _forward(model)
    counts = counter.get_flop_counts()
    blocks = [name for name in counts if ".transformer_blocks." in name and name.count(".") == 2]
    assert len(blocks) == LAYERS
    return sum(sum(counts[name].values()) for name in blocks)


def test_flop_counter_agrees_with_the_plan(model) -> None:
    plan = plan_pruning(model, 0.45, **TOKENS)
    full = _block_flops(model)
    pruned = _block_flops(prune_static(_model(), plan))
    assert abs(pruned / full - plan.flops_ratio) <= 1e-6
    batch = _inputs()["hidden_states"].shape[0]
    assert full == 2 * batch * LAYERS * flops.pixart_block_macs(
        tokens=TOKENS["image_tokens"], context_tokens=TEXT, width=HEADS * HEAD_DIM, head_dim=HEAD_DIM, heads=HEADS)
