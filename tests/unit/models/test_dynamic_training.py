"""Training-time properties of dynamic models: checkpoint recomputation and the complete-model pass."""

from __future__ import annotations

import pytest
import torch
from dynamic_cases import FAMILIES, model_inputs, stock_and_dynamic
from torch import nn

from dydit_scale import flops_ratio, full_width
from dydit_scale.dynamic.routers import Router, complete_rows


def _undecided_routers(model: nn.Module, seed: int = 0) -> None:
    """Router logits around 0 with content dependence, so masks are mixed and noise matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, Router)):
            last = [m for m in router.modules() if isinstance(m, nn.Linear)][-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.3)
            last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.5)


def _loss(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return out.square().mean() + flops_ratio(model).mean()


def _train_step(family: str, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    _, model = stock_and_dynamic(family)
    _undecided_routers(model)
    model.train()
    if checkpointing:
        model.enable_gradient_checkpointing()  # diffusers: torch checkpoint, use_reentrant=False
    torch.manual_seed(123)
    out = model(**model_inputs(family)).sample
    _loss(model, out).backward()
    off = sum((r.decision == 0).sum().item() for r in model.modules() if isinstance(r, Router))
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, off


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_reproduces_router_noise_and_gradients(family):
    plain_out, plain, off = _train_step(family, checkpointing=False)
    ckpt_out, ckpt, _ = _train_step(family, checkpointing=True)
    assert off > 0  # the masks really are stochastic here
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=0)
    assert plain.keys() == ckpt.keys() and any("token_router" in n for n in ckpt)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def _doubled(inputs: dict) -> dict:
    double = {}
    for key, value in inputs.items():
        batched = torch.is_tensor(value) and key not in ("img_ids", "txt_ids")
        double[key] = torch.cat([value, value]) if batched else value
    return double


@pytest.mark.parametrize("family", FAMILIES)
def test_complete_rows_pass_equals_separate_dynamic_and_full_width_passes(family):
    """One 2B forward with the second half complete == a dynamic pass + a full-width pass."""
    _, model = stock_and_dynamic(family)
    _undecided_routers(model)
    model.eval()  # deterministic masks, so both ways see the same architecture
    inputs = model_inputs(family)

    model.zero_grad()
    out = model(**inputs).sample
    dynamic_ratio = flops_ratio(model).detach()
    loss = _loss(model, out)
    with full_width(model):
        full = model(**inputs).sample
    (loss + full.square().mean()).backward()
    separate = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    with complete_rows(model, torch.tensor([False, False, True, True])):
        both = model(**_doubled(inputs)).sample
    ratio = flops_ratio(model)
    (both[:2].square().mean() + ratio[:2].mean() + both[2:].square().mean()).backward()

    assert dynamic_ratio.max() < 1
    torch.testing.assert_close(both[:2], out, atol=1e-6, rtol=0)
    torch.testing.assert_close(both[2:], full, atol=1e-6, rtol=0)
    torch.testing.assert_close(ratio.detach(), torch.cat([dynamic_ratio, torch.ones(2)]))
    for name, grad in separate.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
