"""What every dynamic block shares: its routers by role, the ops its forward is written against, and
the record of its last forward that `last_macs` counts with `flops.block_macs`.

Each dynamic block class writes its forward once, against these ops:

* `_linear(path, x)`: the projection at a submodule path of the block;
* `_unit_mask(role)`: the head or group mask to multiply the units of a role by;
* `_attend(q, k, v, mask)`: attention on [B, S, h, C_H];
* `_routed_update(residual, token_mask, gate, update, *inputs)`: the token-routed residual update;
* `_end_forward(token_mask, batch, shape)`: what the forward leaves for `last_macs`.

Here they are the masked (training) ops: full-width weights and the router masks multiplied in, so
shapes never change. `dydit_scale.infer.fast_blocks` overrides them with weights sliced to the active
units and a gather / scatter of the routed tokens, so both paths run the same forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from dydit_scale.dynamic import flops
from dydit_scale.dynamic.masks import mask_tokens, mask_units
from dydit_scale.dynamic.routers import ForwardState, TimestepRouter
from dydit_scale.dynamic.schedule import LayerEntry, TokenShape

__all__ = ["ROLES", "DynamicBlock", "sdpa"]

#: role in the layer table -> router attribute of a dynamic block
ROLES = {"heads": "head_router", "cross_heads": "cross_head_router", "mlp": "mlp_router",
         "text_mlp": "text_mlp_router"}

#: the last forward: (samples, its token shape, per-sample fp32 [B] counts by role and under "tokens")
Record = tuple[int, TokenShape, dict[str, torch.Tensor]]


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on [B, S, h, C_H] inputs (any head count h), [B, S_q, h, C_H] out.

    `mask`: an SDPA mask broadcastable to [B, h, S_q, S_k] (bool = attend, float = additive).
    """
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2)


class DynamicBlock(ForwardState, nn.Module):
    """A dynamic block: routers by role, masked ops, and the MACs of its last forward."""

    _per_forward = ("_record",)

    kind: str
    """One of `flops.BLOCK_KINDS`."""
    heads: int
    head_dim: int
    hidden: int
    groups: int
    cross_heads: int = 0
    """Cross-attention heads (0: none)."""
    context_width: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self._batch: int | None = None
        self._record: Record | None = None

    def routers_by_role(self) -> dict[str, TimestepRouter]:
        """The block's timestep routers by role (heads, cross_heads, mlp, text_mlp)."""
        found = {role: getattr(self, attr, None) for role, attr in ROLES.items()}
        return {role: router for role, router in found.items() if router is not None}

    def layer_shape(self) -> dict[str, int | None]:
        """The block's own arguments of `flops.block_macs` (those of its `LayerEntry`)."""
        return dict(heads=self.heads, head_dim=self.head_dim, hidden=self.hidden, cross_heads=self.cross_heads,
                    context_width=self.context_width)

    def layer_entry(self, name: str) -> LayerEntry:
        """This block as a row of a schedule's layer table; `name` is its qualified name."""
        routers = {role: f"{name}.{ROLES[role]}" for role in self.routers_by_role()}
        return LayerEntry(name=name, kind=self.kind, groups=self.groups, routers=routers, **self.layer_shape())

    def prepare_step(self, timestep_embedding: torch.Tensor) -> None:
        """Start a forward: nothing recorded yet (a Latte temporal block may not run at all)."""
        self._batch, self._record = timestep_embedding.shape[0], None

    def last_macs(self) -> tuple[torch.Tensor, float] | None:
        """(per-sample MACs [B] of the last forward, full-width MACs); None before any forward."""
        if self._record is None:
            return None
        _, shape, active = self._record
        size = self.layer_shape() | asdict(shape)
        return flops.block_macs(self.kind, **size, active=active), float(flops.block_macs(self.kind, **size))

    # ------------------------------------------------------------------ ops (masked)
    def _linear(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """The projection at submodule `path`: the module itself (LoRA and ZeRO-3 hooks included)."""
        return self.get_submodule(path)(x)

    def _unit_mask(self, role: str) -> torch.Tensor | None:
        """The router decision [B, U] of `role` (None: the role is static)."""
        router = getattr(self, ROLES[role], None)
        return None if router is None else router.decision

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Attention as diffusers' `AttnProcessor2_0` runs it."""
        return sdpa(query, key, value, mask)

    def _routed_update(self, residual: torch.Tensor, token_mask: torch.Tensor | None, gate: torch.Tensor,
                       update: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """residual + gate ⊙ update(*inputs) where `token_mask` [R, N] routes a token; a skipped token
        gets nothing, fc2 bias included. residual and inputs [R, N, ·], gate [R, 1, C]."""
        return residual + mask_tokens(gate * update(*inputs), token_mask)

    def _feed_forward(self, path: str, role: str, x: torch.Tensor) -> torch.Tensor:
        """diffusers' `FeedForward` at `path` with the group mask of `role` before the activation
        (GELU(0) = 0, so a masked group adds nothing). Adapted from diffusers 0.42.1
        `FeedForward.forward` and `GELU.forward`."""
        ff = self.get_submodule(path)
        hidden = ff.net[0].gelu(mask_units(self._linear(f"{path}.net.0.proj", x), self._unit_mask(role)))
        hidden = self._linear(f"{path}.net.2", ff.net[1](hidden))
        for module in ff.net[3:]:
            hidden = module(hidden)
        return hidden

    def _end_forward(self, token_mask: torch.Tensor | None, batch: int, shape: TokenShape) -> None:
        """Keep per-sample (not per-row) active units and routed image tokens, fp32 [B] and
        differentiable through the straight-through masks, for `last_macs`."""
        active = {role: flops.active_units(role, router.decision) for role, router in self.routers_by_role().items()}
        if token_mask is not None:
            active["tokens"] = token_mask.reshape(batch, -1).sum(-1)
        self._record = (batch, shape, active)
