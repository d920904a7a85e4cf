"""Routers: Gumbel-sigmoid statistics, straight-through gradient, forced index 0, bypass, complete rows,
same noise under checkpoint recomputation, router parameters found by type."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dydit_scale.dynamic.masks import mask_tokens
from dydit_scale.dynamic.routers import (
    NOISE_BOUND,
    ConditionedTokenRouter,
    TimestepRouter,
    TokenRouter,
    Router,
    broadcast_timestep,
    complete_rows,
    full_width,
    gumbel_sigmoid,
    router_parameters,
)

LOGITS = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0])


@pytest.mark.parametrize("tau", [0.5, 1.0, 5.0])
def test_train_keep_rate_is_sigmoid_of_logit_for_any_tau(tau):
    samples = 200_000
    mask = gumbel_sigmoid(LOGITS.repeat(samples, 1), tau, training=True)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # binomial standard error ≤ 0.0012; 5 σ
    torch.testing.assert_close(mask.mean(0), torch.sigmoid(LOGITS), atol=0.006, rtol=0)


def test_eval_mask_is_deterministic_step_at_zero():
    logits = torch.linspace(-4, 4, 81)
    first, second = gumbel_sigmoid(logits, 5.0, training=False), gumbel_sigmoid(logits, 5.0, training=False)
    assert torch.equal(first, second) and torch.equal(first, (logits > 0).float())


@pytest.mark.parametrize("tau", [1.0, 5.0])
def test_straight_through_gradient_is_sigmoid_derivative_over_tau(tau):
    logits = torch.linspace(-3, 3, 13, requires_grad=True)
    gumbel_sigmoid(logits, tau, training=False).sum().backward()
    soft = torch.sigmoid(logits.detach() / tau)
    torch.testing.assert_close(logits.grad, soft * (1 - soft) / tau)


def test_logits_above_noise_bound_are_always_kept_in_training():
    mask = gumbel_sigmoid(torch.full((1_000_000,), NOISE_BOUND + 0.01), 5.0, training=True)
    assert mask.min() == 1.0
    assert gumbel_sigmoid(torch.full((1_000_000,), 5.0), 5.0, training=True).min() == 0.0


@pytest.mark.parametrize("training", [True, False])
def test_index_zero_stays_active_with_logits_at_minus_infinity(training):
    router = TimestepRouter(8, 5, tau=5.0, bias=float("-inf")).train(training)
    router.prepare_step(torch.randn(3, 8))
    assert torch.equal(router.decision, torch.tensor([[1.0, 0, 0, 0, 0]]).repeat(3, 1))


def test_fresh_timestep_router_keeps_every_unit_in_training():
    router = TimestepRouter(16, 4, tau=5.0, bias=15.0).train()
    router.prepare_step(torch.randn(10_000, 16))
    assert router.decision.min() == 1.0


def _routers() -> nn.ModuleDict:
    routers = nn.ModuleDict(dict(
        heads=TimestepRouter(8, 4, tau=5.0, bias=float("-inf")),
        tokens=TokenRouter(8, tau=5.0, bias=-50.0),
    ))
    return routers.eval()


def test_full_width_bypasses_every_router_for_forwards_started_inside():
    routers, e_t, x = _routers(), torch.randn(2, 8), torch.randn(2, 6, 8)
    with full_width(routers):
        broadcast_timestep(routers, e_t)
    # a checkpointed recomputation after the block still sees this forward's bypass
    assert routers["tokens"](x).min() == 1.0 and routers["heads"].decision.min() == 1.0
    broadcast_timestep(routers, e_t)
    assert routers["tokens"](x).max() == 0.0 and routers["heads"].decision[:, 1:].max() == 0.0


def test_complete_rows_force_all_ones_only_for_marked_samples():
    routers, e_t = _routers(), torch.randn(4, 8)
    rows = torch.tensor([False, True, False, True])
    with complete_rows(routers, rows):
        broadcast_timestep(routers, e_t)
    heads = routers["heads"].decision
    assert torch.equal(heads.min(1).values, rows.float()) and torch.equal(heads[:, 0], torch.ones(4))
    tokens = routers["tokens"](torch.randn(8, 6, 8))  # two block rows per sample (Latte-like)
    assert torch.equal(tokens.min(1).values, rows.repeat_interleave(2).float())
    assert routers["tokens"].decision is tokens


def test_complete_rows_of_the_wrong_size_is_a_one_line_error():
    routers = _routers()
    with complete_rows(routers, torch.tensor([True, False, True])), pytest.raises(ValueError) as err:
        broadcast_timestep(routers, torch.randn(2, 8))
    assert "\n" not in str(err.value) and "[2]" in str(err.value) and "[3]" in str(err.value)


def test_conditioned_token_router_pools_only_real_text_tokens():
    router = ConditionedTokenRouter(16, tau=5.0, bias=0.0).eval()
    with torch.no_grad():
        router.score.weight.normal_()
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, 32, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    temb = torch.randn(2, 16, generator=g)
    padded = torch.cat([text[:, :4], 100 * torch.randn(2, 3, 16, generator=g)], 1)
    keep = torch.tensor([[True] * 4 + [False] * 3] * 2)
    expected = router(image, text[:, :4], temb)
    assert 0 < expected.mean() < 1
    assert torch.equal(router(image, padded, temb, keep), expected)
    assert not torch.equal(router(image, padded, temb), expected)


class _Block(nn.Module):
    """x → token-routed MLP update, the SDT pattern of a dynamic block."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.router = TokenRouter(8, tau=5.0, bias=0.0)
        nn.init.normal_(self.router.fc2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + mask_tokens(self.fc2(torch.relu(self.fc1(x))), self.router(x))


def _grads(use_checkpoint: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    block = _Block().train()
    x = torch.randn(4, 10, 8, requires_grad=True)
    torch.manual_seed(1)
    out = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
    (out.square().sum() + block.router.decision.sum()).backward()  # both losses reach the router
    return out.detach(), [p.grad for p in block.parameters()] + [x.grad]


def test_checkpoint_recomputation_reproduces_router_noise():
    plain_out, plain = _grads(False)
    ckpt_out, ckpt = _grads(True)
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=0)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_router_parameters_are_found_by_type_not_by_name():
    model = nn.ModuleDict(dict(
        head_router=TimestepRouter(8, 4, tau=5.0, bias=15.0),
        blocks=nn.ModuleList([nn.ModuleDict(dict(token_router=TokenRouter(8, tau=5.0, bias=35.0)))]),
        router=nn.Linear(8, 8),  # a user layer that only carries the name
    ))
    model.register_parameter("router_weight", nn.Parameter(torch.zeros(3)))
    found = router_parameters(model)
    assert set(found) == {"head_router.proj.weight", "head_router.proj.bias", "blocks.0.token_router.fc1.weight",
                          "blocks.0.token_router.fc1.bias", "blocks.0.token_router.fc2.weight",
                          "blocks.0.token_router.fc2.bias"}
    params = dict(model.named_parameters())
    assert all(found[name] is params[name] for name in found)


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_router_parameters_cover_every_router_of_a_tiny_dynamic_model(family):
    from dydit_scale.config import DynamicConfig
    from dydit_scale.models.convert import make_dynamic
    from dydit_scale.models.tiny import tiny_transformer

    model = make_dynamic(tiny_transformer(family), DynamicConfig())
    expected = {f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, Router)
                for name, _ in module.named_parameters()}
    found = router_parameters(model)
    assert found and set(found) == expected
    assert any(isinstance(m, TimestepRouter) for m in model.modules())
    params = dict(model.named_parameters())
    assert all(found[name] is params[name] for name in found)
