"""Dense masked execution equals an independent reference that slices the weights.

Per block type, random per-sample head/group masks and per-token masks are forced into the routers;
the reference computes each sample with only the active heads' rows/columns, the active groups'
channels and only the routed tokens (gather, MLP, scatter; skipped tokens get no fc2 bias).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from dynamic_cases import FULL_AT_INIT, IMG_IDS, stock_and_dynamic
from torch import nn

from dydit_scale.config import DynamicConfig

ATOL = 2e-5  # fp32, different reduction orders


def _unit_mask(batch: int, units: int, gen: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(batch, units, generator=gen) > 0.5).float()
    mask[:, 0] = 1.0
    return mask


def _force(block: nn.Module, gen: torch.Generator, batch: int, rows: int, tokens: int) -> dict[str, torch.Tensor]:
    """Random decisions for every router of `block`; returns them by router name."""
    masks = {}
    for name in ("head_router", "cross_head_router", "mlp_router", "text_mlp_router"):
        router = getattr(block, name, None)
        if router is not None:
            router.decision = masks[name] = _unit_mask(batch, router.units, gen)
    token_mask = (torch.rand(rows, tokens, generator=gen) > 0.4).float()
    block.token_router.forward = lambda *args, **kwargs: token_mask
    masks["token_router"] = token_mask
    return masks


def _channels(mask_row: torch.Tensor, size: int) -> torch.Tensor:
    units = mask_row.nonzero().flatten()
    return (units[:, None] * size + torch.arange(size)).flatten()


def _rows(linear: nn.Linear, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, linear.weight[idx], None if linear.bias is None else linear.bias[idx])


def _cols(linear: nn.Linear, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, linear.weight[:, idx], linear.bias)


def _sliced_mlp(fc1: nn.Linear, fc2: nn.Linear | None, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    hidden = F.gelu(_rows(fc1, idx, x), approximate="tanh")
    return hidden if fc2 is None else _cols(fc2, idx, hidden)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # [1, N, h, d]


def _sdpa(q, k, v, mask=None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


# ---------------------------------------------------------------- FLUX

def _flux_qkv(attn, x, idx, norms=("norm_q", "norm_k"), projs=("to_q", "to_k", "to_v")):
    q, k, v = (_heads(_rows(getattr(attn, p), idx, x), attn.head_dim) for p in projs)
    return getattr(attn, norms[0])(q), getattr(attn, norms[1])(k), v


def _ref_flux_double(block, x, c, temb, rotary, m):
    out_c, out_x = [], []
    hd, group = block.attn.head_dim, block.hidden // block.groups
    for b in range(x.shape[0]):
        xb, cb, tb = x[b:b + 1], c[b:b + 1], temb[b:b + 1]
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(xb, emb=tb)
        nc, c_gate_msa, c_shift, c_scale, c_gate_mlp = block.norm1_context(cb, emb=tb)
        heads = _channels(m["head_router"][b], hd)
        q, k, v = _flux_qkv(block.attn, nx, heads)
        eq, ek, ev = _flux_qkv(
            block.attn, nc, heads, ("norm_added_q", "norm_added_k"), ("add_q_proj", "add_k_proj", "add_v_proj")
        )
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
        attn = _sdpa(q, k, v)
        n_t = cb.shape[1]
        xb = xb + gate_msa[:, None] * _cols(block.attn.to_out[0], heads, attn[:, n_t:])
        cb = cb + c_gate_msa[:, None] * _cols(block.attn.to_add_out, heads, attn[:, :n_t])
        tokens = m["token_router"][b].nonzero().flatten()
        nx = block.norm2(xb) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        update = torch.zeros_like(xb)
        ff = block.ff
        groups = _channels(m["mlp_router"][b], group)
        update[:, tokens] = gate_mlp[:, None] * _sliced_mlp(ff.net[0].proj, ff.net[2], groups, nx[:, tokens])
        out_x.append(xb + update)
        nc = block.norm2_context(cb) * (1 + c_scale[:, None]) + c_shift[:, None]
        out_c.append(cb + c_gate_mlp[:, None] * block.ff_context(nc))
    return torch.cat(out_c), torch.cat(out_x)


def _ref_flux_single(block, x, c, temb, rotary, m):
    out_c, out_x = [], []
    hd, group, width = block.attn.head_dim, block.hidden // block.groups, block.proj_mlp.in_features
    n_t = c.shape[1]
    for b in range(x.shape[0]):
        hb = torch.cat([c[b:b + 1], x[b:b + 1]], 1)
        norm, gate = block.norm(hb, emb=temb[b:b + 1])
        heads, groups = _channels(m["head_router"][b], hd), _channels(m["mlp_router"][b], group)
        q, k, v = _flux_qkv(block.attn, norm, heads)
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
        attn = _sdpa(q, k, v)
        routed = torch.cat([torch.arange(n_t), n_t + m["token_router"][b].nonzero().flatten()])
        mlp = _sliced_mlp(block.proj_mlp, None, groups, norm[:, routed])
        out = _cols(block.proj_out, torch.cat([heads, width + groups]), torch.cat([attn[:, routed], mlp], -1))
        update = torch.zeros_like(hb)
        update[:, routed] = gate[:, None] * out
        hb = hb + update
        out_c.append(hb[:, :n_t])
        out_x.append(hb[:, n_t:])
    return torch.cat(out_c), torch.cat(out_x)


@pytest.mark.parametrize("kind", ["double", "single"])
def test_masked_flux_block_equals_sliced_reference(kind):
    _, model = stock_and_dynamic("flux", FULL_AT_INIT)
    block = (model.transformer_blocks if kind == "double" else model.single_transformer_blocks)[1]
    gen = torch.Generator().manual_seed(3)
    x, c = torch.randn(3, 16, 64, generator=gen), torch.randn(3, 5, 64, generator=gen)
    temb = torch.randn(3, 64, generator=gen)
    rotary = model.pos_embed(torch.cat([torch.zeros(5, 3), IMG_IDS]))
    masks = _force(block, gen, 3, 3, 16)
    with torch.no_grad():
        got = block(x, c, temb, rotary)
        expected = (_ref_flux_double if kind == "double" else _ref_flux_single)(block, x, c, temb, rotary, masks)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- PixArt / Latte

def _sliced_attention(attn, x, context, heads, mask=None):
    hd = attn.to_q.out_features // attn.heads
    q = _heads(_rows(attn.to_q, heads, x), hd)
    k, v = (_heads(_rows(p, heads, context), hd) for p in (attn.to_k, attn.to_v))
    return _cols(attn.to_out[0], heads, _sdpa(q, k, v, mask))


def _ref_adaln(block, x, timestep, context, context_mask, m):
    rows, per_sample = x.shape[0], x.shape[0] // m["mlp_router"].shape[0]
    hd, group = block.head_dim, block.hidden // block.groups
    out = []
    for r in range(rows):
        b, xr = r // per_sample, x[r:r + 1]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + timestep[r:r + 1].reshape(1, 6, -1)
        ).chunk(6, dim=1)
        norm = block.norm1(xr) * (1 + scale_msa) + shift_msa
        xr = gate_msa * _sliced_attention(block.attn1, norm, norm, _channels(m["head_router"][b], hd)) + xr
        if block.attn2 is not None:
            mask = context_mask[r:r + 1, None]
            if "cross_head_router" in m:
                cross = _channels(m["cross_head_router"][b], hd)
                xr = _sliced_attention(block.attn2, xr, context[r:r + 1], cross, mask) + xr
            else:
                xr = block.attn2(xr, encoder_hidden_states=context[r:r + 1], attention_mask=context_mask[r:r + 1]) + xr
        tokens = m["token_router"][r].nonzero().flatten()
        norm = block.norm2(xr) * (1 + scale_mlp) + shift_mlp
        update = torch.zeros_like(xr)
        ff = block.ff
        groups = _channels(m["mlp_router"][b], group)
        update[:, tokens] = gate_mlp * _sliced_mlp(ff.net[0].proj, ff.net[2], groups, norm[:, tokens])
        out.append(xr + update)
    return torch.cat(out)


@pytest.mark.parametrize(
    "family, stack, rows_per_sample, tokens, cross",
    [
        ("pixart", "transformer_blocks", 1, 16, True),
        ("pixart", "transformer_blocks", 1, 16, False),
        ("latte", "transformer_blocks", 4, 16, False),
        ("latte", "temporal_transformer_blocks", 16, 4, False),
    ],
)
def test_masked_adaln_block_equals_sliced_reference(family, stack, rows_per_sample, tokens, cross):
    _, model = stock_and_dynamic(family, DynamicConfig(cross_attention=cross))
    block = getattr(model, stack)[1]
    gen = torch.Generator().manual_seed(4)
    batch, rows = 2, 2 * rows_per_sample
    x, timestep = torch.randn(rows, tokens, 32, generator=gen), torch.randn(rows, 6 * 32, generator=gen)
    context = torch.randn(rows, 5, 32, generator=gen) if block.attn2 is not None else None
    context_mask = torch.zeros(rows, 1, 5)
    context_mask[0, :, 3:] = -10000.0  # padded text, as PixArt's forward turns a 0/1 mask into a bias
    masks = _force(block, gen, batch, rows, tokens)
    block.prepare_step(torch.zeros(batch, 32))
    with torch.no_grad():
        got = block(x, None, context, context_mask if context is not None else None, timestep)
        expected = _ref_adaln(block, x, timestep, context, context_mask, masks)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert block.last_macs()[0].shape == (batch,)
