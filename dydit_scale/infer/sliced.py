"""Building blocks of sliced execution: weights of the active units, attention, kept token rows.

* Q/K/V (and fc1, proj_mlp) keep the *rows* of the active heads / groups (and their bias entries);
  W_O (fc2, the fused proj_out) keeps the matching *columns* and its full bias.
* LoRA is merged before slicing (a sliced `F.linear` bypasses the adapter's forward): TD-LoRA with
  this step's π, peft LoRA with its delta.
* Attention runs on |𝓗| heads through `F.scaled_dot_product_attention`, or xformers on CUDA when
  asked for; xformers is imported only then, so CPU runs never import it.
"""

from __future__ import annotations

from typing import Literal

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from dydit_scale.lora.td_lora import TDLoRALinear
from dydit_scale.models.build import attention_problem
from dydit_scale.models.dynamic_block import sdpa

__all__ = ["Attention", "Sliced", "attend", "check_attention", "effective_linear", "kept_rows", "slice_linear",
           "unit_index"]

#: (weight, bias) of a (sliced) linear layer
Sliced = tuple[torch.Tensor, torch.Tensor | None]
Attention = Literal["sdpa", "xformers"]


def effective_linear(linear: nn.Module) -> Sliced:
    """(W, b) of a linear with its LoRA merged: TD-LoRA at this forward's π, peft's delta."""
    if isinstance(linear, TDLoRALinear):
        pi = linear.gate.pi
        if pi is None:
            raise RuntimeError("fast path: TD-LoRA gate has no π for this step (the model forward sets it)")
        return linear.merged_weight(pi[0]), linear.bias
    if isinstance(linear, LoraLayer):
        base = linear.get_base_layer()
        weight = base.weight
        if not linear.merged and not linear.disable_adapters:
            for name in linear.active_adapters:
                if name in linear.lora_A:
                    if linear.use_dora.get(name):
                        raise ValueError("fast path: DoRA adapters are not supported; merge them first")
                    weight = weight + linear.get_delta_weight(name).to(weight.dtype)
        return weight, base.bias
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"fast path: expected a Linear (or LoRA-wrapped Linear), got {type(linear).__name__}")
    return linear.weight, linear.bias


def unit_index(active: torch.Tensor, size: int, offset: int = 0) -> torch.Tensor:
    """Channel indices of the active units (bool [U]) of `size` channels each, shifted by `offset`."""
    units = active.nonzero().squeeze(1)
    return (offset + units[:, None] * size + torch.arange(size)).reshape(-1)


def slice_linear(linear: nn.Module, dim: Literal[0, 1], index: torch.Tensor | None) -> Sliced:
    """Rows (dim 0, bias sliced too) or columns (dim 1, full bias) `index` of the effective weight;
    `index` None keeps everything without copying a plain Linear."""
    weight, bias = effective_linear(linear)
    if index is None:
        return weight, bias
    index = index.to(weight.device)
    weight = weight.index_select(dim, index).contiguous()
    if dim == 0 and bias is not None:
        bias = bias.index_select(0, index)
    return weight, bias


def check_attention(kind: Attention) -> None:
    """xformers only where it can run (CUDA + the package): never a silent fallback."""
    if kind not in ("sdpa", "xformers"):
        raise ValueError(f"apply_schedule: attention must be sdpa or xformers, got {kind!r}")
    problem = attention_problem(kind)
    if problem is not None:
        raise ValueError(f"apply_schedule: {problem.removeprefix('model.attention: ')}")


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           kind: Attention) -> torch.Tensor:
    """Attention on [B, S, h, C_H] inputs (any head count h), returns [B, S_q, h, C_H].

    `mask`: an SDPA mask broadcastable to [B, h, S_q, S_k] (bool = attend, float = additive).
    """
    return _xformers_attention(query, key, value, mask) if kind == "xformers" else sdpa(query, key, value, mask)


def _xformers_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """xformers' memory-efficient attention; a mask becomes a materialised additive bias whose last
    dimension is padded to a multiple of 8 (the kernels' alignment rule)."""
    import xformers.ops

    bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        b, sq, h, _ = query.shape
        sk = key.shape[1]
        padded = torch.empty(b, h, sq, -(-sk // 8) * 8, dtype=query.dtype, device=query.device)
        bias = padded[..., :sk]
        bias.copy_(mask.to(query.dtype).expand(b, h, sq, sk))
    return xformers.ops.memory_efficient_attention(query, key, value, attn_bias=bias)


def kept_rows(token_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Flat indices of the kept tokens of a mask [R, N]; None when every token is kept."""
    if token_mask is None:
        return None
    rows = token_mask.reshape(-1).nonzero().squeeze(1)
    return None if rows.numel() == token_mask.numel() else rows
