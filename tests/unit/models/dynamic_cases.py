"""Inputs and helpers shared by the dynamic-model tests (tiny transformers of `dydit_scale.models.tiny`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dydit_scale import make_dynamic
from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.routers import Router
from dydit_scale.models.tiny import tiny_transformer

FAMILIES = ["flux", "pixart", "latte", "dit", "sit"]

#: A fresh DyFLUX model keeps every token in training only with a token-router bias above the
#: logistic-noise bound (16.6); the config default 5 (DyFLUX parity) keeps ≈ σ(5) = 99.3 %.
FULL_AT_INIT = DynamicConfig(flux_token_router_bias=35.0)

_ROWS, _COLS = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
IMG_IDS = torch.stack([torch.zeros(16), _ROWS.flatten(), _COLS.flatten()], dim=-1)  # [16, 3]


def model_inputs(family: str, batch: int = 2, seed: int = 0, scale: float = 1.0) -> dict:
    """Keyword inputs of the tiny transformer's forward (per-sample timesteps differ)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 5, 32, generator=g)
    if family == "flux":
        return dict(
            hidden_states=torch.randn(batch, 16, 16, generator=g) * scale, encoder_hidden_states=text,
            pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.rand(batch, generator=g),
            img_ids=IMG_IDS, txt_ids=torch.zeros(5, 3), guidance=torch.full((batch,), 3.5),
        )
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    if family in ("dit", "sit"):
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g) * scale, timestep=timestep,
                    class_labels=torch.randint(0, 1000, (batch,), generator=g))
    if family == "pixart":
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g) * scale, encoder_hidden_states=text,
                    timestep=timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(hidden_states=torch.randn(batch, 4, 4, 8, 8, generator=g) * scale, encoder_hidden_states=text,
                timestep=timestep)


def stock_and_dynamic(family: str, config: DynamicConfig = FULL_AT_INIT) -> tuple[nn.Module, nn.Module]:
    """A tiny stock model and a dynamic model made from an identical copy.

    DiT drops class labels at random in train mode (classifier-free guidance training); the routers
    draw from the same RNG, so the two models would drop different labels: the tests switch it off.
    """
    stock = tiny_transformer(family)
    for module in stock.modules():
        if hasattr(module, "dropout_prob") and hasattr(module, "embedding_table"):
            module.dropout_prob = 0.0
    return stock, make_dynamic(copy.deepcopy(stock), config)


def set_router_bias(model: nn.Module, value: float) -> None:
    """Put every router's output bias at `value` and zero its output weight (logits = value)."""
    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, Router)):
            last = [m for m in router.modules() if isinstance(m, nn.Linear)][-1]
            last.weight.zero_()
            last.bias.fill_(value)
