"""Dynamic `BasicTransformerBlock` with `ada_norm_single`, shared by PixArt-α and Latte (spec §10, §11).

Order of operations (spec §4): self-attention with the head mask before W_O → cross-attention
(static unless `dynamic.cross_attention`, then its own head router) → the DiT-style token router on
the residual stream → FFN with the group mask before GELU, the token mask on the gated output.
Block rows may be several per sample (Latte: B·F spatial, B·S temporal, sample-major); per-sample
TDW masks are repeated to the rows, token masks are per row.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic import flops
from dydit_scale.dynamic.importance import PermutedSpan, UnitSlice, permute_block
from dydit_scale.dynamic.masks import mask_tokens, mask_units
from dydit_scale.dynamic.routers import ForwardState, TimestepRouter, TokenRouter
from dydit_scale.models.dynamic_model import (
    check_feed_forward,
    masked_feed_forward,
    mlp_groups,
    move_children,
    timestep_router,
)

__all__ = ["BlockKind", "DyAdaLNTransformerBlock", "check_adaln_block", "head_parts", "permute_adaln_block"]

#: pixart: PixArt-α block; latte_spatial: rows B·F, tokens S; latte_temporal: rows B·S, tokens F.
BlockKind = Literal["pixart", "latte_spatial", "latte_temporal"]


def masked_attention(
    attn: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    head_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention with the head mask [B, H] before W_O (spec §2.4).

    Adapted from diffusers 0.42.1 `AttnProcessor2_0.__call__` for 3-D inputs and the plain
    `Attention` that `check_adaln_block` admits (no norms, no residual, unfused projections).
    """
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch, length = context.shape[:2]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](mask_units(out, head_mask)))
    return out / attn.rescale_output_factor


def _decision(router: TimestepRouter | None) -> torch.Tensor | None:
    return None if router is None else router.decision


class DyAdaLNTransformerBlock(ForwardState, nn.Module):
    """Dynamic PixArt-α / Latte block: TDW over self-attention heads (and optionally cross-attention
    heads) and FFN groups, SDT before the FFN."""

    _per_forward = ("_record",)

    def __init__(self, block: BasicTransformerBlock, config: DynamicConfig, kind: BlockKind, where: str):
        super().__init__()
        move_children(block, self)
        self.attn2: Attention | None = getattr(block, "attn2", None)
        self.kind = kind
        width, like = block.dim, self.attn1.to_q.weight
        self.heads, self.head_dim = self.attn1.heads, self.attn1.to_q.out_features // self.attn1.heads
        self.hidden = self.ff.net[0].proj.out_features
        self.groups = mlp_groups(config, self.heads, self.hidden, f"{where}.ff")
        self.head_router = timestep_router(width, self.heads, config, like) if config.heads else None
        self.cross_head_router = None
        if config.cross_attention and self.attn2 is not None:
            self.cross_head_router = timestep_router(width, self.attn2.heads, config, like)
        self.mlp_router = timestep_router(width, self.groups, config, like)
        self.token_router = None
        if config.tokens:
            router = TokenRouter(width, tau=config.tau, bias=config.token_router_bias)
            self.token_router = router.to(device=like.device, dtype=like.dtype)
        self._batch: int | None = None
        self._record: dict[str, Any] | None = None

    def prepare_step(self, timestep_embedding: torch.Tensor) -> None:
        """Start a forward: nothing recorded yet (a Latte temporal block may not run at all)."""
        self._batch, self._record = timestep_embedding.shape[0], None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # Adapted from diffusers 0.42.1 BasicTransformerBlock.forward, norm_type "ada_norm_single".
        if cross_attention_kwargs:
            unknown = sorted(cross_attention_kwargs)
            raise ValueError(f"dynamic blocks: cross_attention_kwargs {unknown} are not supported")
        batch_size = hidden_states.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)
        ).chunk(6, dim=1)
        norm_hidden_states = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        head_mask = _decision(self.head_router)
        attn_output = masked_attention(self.attn1, norm_hidden_states, None, attention_mask, head_mask)
        hidden_states = gate_msa * attn_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)

        context_tokens = 0
        if self.attn2 is not None:
            context_tokens = encoder_hidden_states.shape[1]
            if self.cross_head_router is None:  # static cross-attention: the stock module call
                attn_output = self.attn2(
                    hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask
                )
            else:
                attn_output = masked_attention(
                    self.attn2, hidden_states, encoder_hidden_states, encoder_attention_mask,
                    self.cross_head_router.decision,
                )
            hidden_states = attn_output + hidden_states

        token_mask = None if self.token_router is None else self.token_router(hidden_states)
        norm_hidden_states = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        ff_output = gate_mlp * masked_feed_forward(self.ff, norm_hidden_states, self.mlp_router.decision)
        hidden_states = mask_tokens(ff_output, token_mask) + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)

        self._record = self._counts(hidden_states, token_mask, context_tokens)
        return hidden_states

    def _counts(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None, context_tokens: int
    ) -> dict[str, Any]:
        """Per-sample (not per-row) active heads, group fraction and active tokens, fp32 [B]."""
        rows, tokens = hidden_states.shape[:2]
        batch = self._batch or rows
        ones = torch.ones(batch, device=hidden_states.device)
        active = ones * (rows // batch * tokens) if token_mask is None else token_mask.reshape(batch, -1).sum(-1)
        return dict(
            rows_per_sample=rows // batch, tokens=tokens, context_tokens=context_tokens,
            active_heads=ones * self.heads if self.head_router is None else self.head_router.decision.sum(-1),
            cross_heads=None if self.cross_head_router is None else self.cross_head_router.decision.sum(-1),
            group_fraction=self.mlp_router.decision.mean(-1),
            active_tokens=active,
        )

    def last_macs(self) -> tuple[torch.Tensor, float] | None:
        """(per-sample MACs [B] of the last forward, full-width MACs), spec §5.3 PixArt / Latte."""
        if self._batch is None:
            return None
        if self._record is None:  # prepared but not run (Latte with enable_temporal_attentions=False)
            return torch.zeros(self._batch), 0.0
        dynamic = {key: self._record[key] for key in ("active_heads", "group_fraction", "active_tokens")}
        return self._macs(dynamic, self._record["cross_heads"]), float(self._macs({}, None))

    def _macs(self, dynamic: dict[str, Any], cross_heads: torch.Tensor | None) -> torch.Tensor | float:
        """Block MACs per sample from the flops.py formula of this block kind."""
        rec = self._record
        shape = dict(width=self.heads * self.head_dim, head_dim=self.head_dim, heads=self.heads,
                     mlp_ratio=self.hidden / (self.heads * self.head_dim))
        context = dict(context_tokens=rec["context_tokens"], cross_heads=cross_heads,
                       context_width=None if self.attn2 is None else self.attn2.to_k.in_features)
        if self.kind == "pixart":
            return flops.pixart_block_macs(tokens=rec["tokens"], **context, **shape, **dynamic)
        if self.kind == "latte_spatial":
            return flops.latte_spatial_block_macs(
                frames=rec["rows_per_sample"], tokens_per_frame=rec["tokens"], **context, **shape, **dynamic
            )
        return flops.latte_temporal_block_macs(
            frames=rec["tokens"], tokens_per_frame=rec["rows_per_sample"], **shape, **dynamic
        )


def _check_attention(attn: Attention, where: str) -> None:
    plain = (
        type(attn.processor) is AttnProcessor2_0 and attn.spatial_norm is None and attn.group_norm is None
        and attn.norm_q is None and attn.norm_k is None and attn.norm_cross is None
        and not attn.residual_connection and not attn.fused_projections
    )
    if not plain:
        raise ValueError(
            f"make_dynamic: {where} must be a plain Attention with AttnProcessor2_0 and unfused projections, "
            f"got {type(attn.processor).__name__}; call set_default_attn_processor() / unfuse_qkv_projections() first"
        )


def check_adaln_block(block: BasicTransformerBlock, config: DynamicConfig, where: str) -> None:
    """Reject block variants the dynamic forward does not implement, before any weight moves."""
    if block.norm_type != "ada_norm_single" or block.only_cross_attention or block.pos_embed is not None:
        raise ValueError(f"make_dynamic: {where} must be an ada_norm_single BasicTransformerBlock (PixArt-α / Latte)")
    if block._chunk_size is not None or hasattr(block, "fuser"):
        raise ValueError(f"make_dynamic: {where} uses chunked feed-forward or GLIGEN; dynamic blocks support neither")
    _check_attention(block.attn1, f"{where}.attn1")
    if config.cross_attention and block.attn2 is not None:
        _check_attention(block.attn2, f"{where}.attn2")
    check_feed_forward(block.ff, f"{where}.ff")
    mlp_groups(config, block.attn1.heads, block.ff.net[0].proj.out_features, f"{where}.ff")


def head_parts(attn: Attention) -> list[UnitSlice]:
    """The heads of `attn` as the magnitude ranking sees them: Q/K/V rows and W_O columns."""
    head_dim = attn.to_q.out_features // attn.heads
    parts = [UnitSlice(p, True, head_dim) for p in (attn.to_q, attn.to_k, attn.to_v)]
    return parts + [UnitSlice(attn.to_out[0], False, head_dim)]


def permute_adaln_block(block: BasicTransformerBlock, config: DynamicConfig,
                        where: str) -> tuple[dict[str, torch.Tensor], list[PermutedSpan]]:
    """Rank and permute self-attention heads, cross-attention heads (if dynamic) and FFN channels."""
    attns = {"heads": block.attn1} if config.heads else {}
    if config.cross_attention and block.attn2 is not None:
        attns["cross_heads"] = block.attn2
    units = {key: (head_parts(attn), attn.heads) for key, attn in attns.items()}
    fc1, fc2 = block.ff.net[0].proj, block.ff.net[2]
    units["mlp"] = ([UnitSlice(fc1, True, 1), UnitSlice(fc2, False, 1)], fc1.out_features)
    return permute_block(block, units, config.importance_norm, where)
