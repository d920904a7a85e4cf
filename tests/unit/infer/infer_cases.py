"""Tiny dynamic models with scattered router decisions, and their inputs, for the fast-path tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dydit_scale import make_dynamic
from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.routers import ConditionedTokenRouter, TimestepRouter, TokenRouter
from dydit_scale.models.tiny import tiny_transformer

FAMILIES = ["flux", "pixart", "latte", "dit", "sit"]

_ROWS, _COLS = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
IMG_IDS = torch.stack([torch.zeros(16), _ROWS.flatten(), _COLS.flatten()], dim=-1)  # [16, 3]


def time_keys(family: str) -> torch.Tensor:
    """Three keys as the family's pipeline passes them (FLUX σ and SiT 1000·σ in fp32, DDPM integer indices)."""
    if family in ("flux", "sit"):
        return torch.tensor([1.0, 0.62, 0.13]) * (1000 if family == "sit" else 1)
    return torch.tensor([999, 500, 21])


def model_inputs(family: str, timestep: torch.Tensor, batch: int = 2, seed: int = 0) -> dict:
    """Keyword inputs of the tiny transformer's forward; every sample shares `timestep` (a scalar)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 5, 32, generator=g)
    t = timestep.reshape(1).expand(batch)
    if family == "flux":
        return dict(hidden_states=torch.randn(batch, 16, 16, generator=g), encoder_hidden_states=text,
                    pooled_projections=torch.randn(batch, 32, generator=g), timestep=t, img_ids=IMG_IDS,
                    txt_ids=torch.zeros(5, 3), guidance=torch.full((batch,), 3.5))
    if family in ("dit", "sit"):
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=t,
                    class_labels=torch.randint(0, 1000, (batch,), generator=g))
    if family == "pixart":
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), encoder_hidden_states=text, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(hidden_states=torch.randn(batch, 4, 4, 8, 8, generator=g), encoder_hidden_states=text, timestep=t)


def dynamic_model(family: str, mode: str = "random", seed: int = 0, **config) -> nn.Module:
    """A tiny dynamic model in eval mode whose routers give `mode` masks: random (scattered, changing
    with t; token routers drop some tokens), all_on, or index0 (only unit 0 of every router)."""
    base = dict(flux_token_router_bias=35.0)
    model = make_dynamic(copy.deepcopy(tiny_transformer(family)), DynamicConfig(**(base | config))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.modules():
            if isinstance(router, TimestepRouter):
                weight = torch.randn(router.proj.weight.shape, generator=g) * (2.0 if mode == "random" else 0.0)
                router.proj.weight.copy_(weight)
                router.proj.bias.fill_({"random": 0.0, "all_on": 30.0, "index0": -30.0}[mode])
            elif isinstance(router, (TokenRouter, ConditionedTokenRouter)) and mode == "random":
                last = router.fc2 if isinstance(router, TokenRouter) else router.score
                last.weight.copy_(torch.randn(last.weight.shape, generator=g))
                last.bias.fill_(0.5)
    return model
