"""DyFLUX blocks: dynamic double- and single-stream FLUX blocks.

* Heads are joint: one head mask acts on the image (to_q/k/v, to_out) and text (add_q/k/v_proj,
  to_add_out) projections, because both streams share the heads of the joint attention.
* Double block: the image FFN is width-dynamic and token-routed (router after the attention
  residual); the text FFN is static unless `dynamic.text_mlp`.
* Single block: one fused proj_out(concat[attn (C), mlp (D)]); heads mask the attention part and
  groups the MLP part before it. The token router reads the block input; a skipped image token gets
  a zero residual update but still serves as key/value.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic import flops
from dydit_scale.dynamic.masks import key_padding_mask, mask_tokens, mask_units
from dydit_scale.dynamic.routers import ConditionedTokenRouter, ForwardState, TimestepRouter
from dydit_scale.models.dynamic_model import (
    masked_feed_forward,
    mlp_groups,
    move_children,
    timestep_router,
)

__all__ = ["DyFluxSingleTransformerBlock", "DyFluxTransformerBlock", "joint_attention"]


def _decision(router: TimestepRouter | None) -> torch.Tensor | None:
    return None if router is None else router.decision


def _attention_mask(joint_attention_kwargs: dict[str, Any] | None) -> torch.Tensor | None:
    """The only joint-attention kwarg the dynamic blocks accept: an SDPA `attention_mask`."""
    kwargs = joint_attention_kwargs or {}
    unknown = sorted(set(kwargs) - {"attention_mask"})
    if unknown:
        raise ValueError(f"dynamic FLUX blocks: joint_attention_kwargs {unknown} are not supported")
    return kwargs.get("attention_mask")


def joint_attention(
    attn: FluxAttention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    attention_mask: torch.Tensor | None,
    head_mask: torch.Tensor | None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FLUX (joint) attention with the head mask [B, H] before the output projections (§2.4).

    Adapted from diffusers 0.42.1 `FluxAttnProcessor.__call__` (unfused projections).
    """
    def heads(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return proj(x).unflatten(-1, (-1, attn.head_dim))

    query, key, value = (heads(proj, hidden_states) for proj in (attn.to_q, attn.to_k, attn.to_v))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if encoder_hidden_states is not None:
        projs = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        enc_query, enc_key, enc_value = (heads(proj, encoder_hidden_states) for proj in projs)
        query = torch.cat([attn.norm_added_q(enc_query), query], dim=1)
        key = torch.cat([attn.norm_added_k(enc_key), key], dim=1)
        value = torch.cat([enc_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    out = dispatch_attention_fn(
        query, key, value, attn_mask=attention_mask,
        backend=attn.processor._attention_backend, parallel_config=attn.processor._parallel_config,
    )
    out = mask_units(out.flatten(2, 3).to(query.dtype), head_mask)
    if encoder_hidden_states is None:
        return out
    text_len = encoder_hidden_states.shape[1]
    encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(encoder_out.contiguous())


class _FluxBlockBase(ForwardState, nn.Module):
    """Routers, per-forward bookkeeping and the token router call shared by both FLUX blocks."""

    _per_forward = ("_record",)

    def _add_routers(self, attn: FluxAttention, hidden: int, config: DynamicConfig, where: str) -> None:
        width, like = attn.query_dim, attn.to_q.weight
        self.heads, self.head_dim, self.hidden = attn.heads, attn.head_dim, hidden
        self.groups = mlp_groups(config, attn.heads, hidden, where)
        self.head_router = timestep_router(width, attn.heads, config, like) if config.heads else None
        self.mlp_router = timestep_router(width, self.groups, config, like)
        self.token_router = None
        if config.tokens:
            router = ConditionedTokenRouter(width, tau=config.tau, bias=config.flux_token_router_bias)
            self.token_router = router.to(device=like.device, dtype=like.dtype)
        self._tokens: dict[str, int] = {}
        self._record: dict[str, torch.Tensor] | None = None

    def prepare_step(self, timestep_embedding: torch.Tensor) -> None:
        """Start a forward: nothing recorded yet for `last_macs`."""
        self._record = None

    def _route_tokens(
        self, image: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """SDT mask [B, N_i]; the text mean skips padding keys of the attention mask (P15)."""
        if self.token_router is None:
            return None
        text_mask = None if attention_mask is None else key_padding_mask(attention_mask, slice(0, text.shape[1]))
        return self.token_router(image, text, temb, text_mask)

    def _remember(self, image: torch.Tensor, text_tokens: int, token_mask: torch.Tensor | None) -> None:
        """Keep this forward's token counts and per-sample active heads, group fraction and routed
        image tokens (fp32 [B], differentiable through the straight-through masks) for `last_macs`."""
        ones = torch.ones(image.shape[0], device=image.device)
        heads = ones * self.heads if self.head_router is None else self.head_router.decision.sum(-1)
        tokens = ones * image.shape[1] if token_mask is None else token_mask.sum(-1)
        self._tokens = dict(image_tokens=image.shape[1], text_tokens=text_tokens)
        self._record = dict(active_heads=heads, group_fraction=self.mlp_router.decision.mean(-1),
                            active_image_tokens=tokens)

    def _full(self) -> dict[str, Any]:
        """The block's static shape arguments of the flops.py formulas."""
        return dict(width=self.heads * self.head_dim, head_dim=self.head_dim, heads=self.heads,
                    mlp_ratio=self.hidden / (self.heads * self.head_dim))


class DyFluxTransformerBlock(_FluxBlockBase):
    """Dynamic `FluxTransformerBlock` (double stream): joint heads, image FFN with TDW + SDT."""

    def __init__(self, block: FluxTransformerBlock, config: DynamicConfig, where: str):
        super().__init__()
        move_children(block, self)
        self._add_routers(self.attn, self.ff.net[0].proj.out_features, config, where)
        self.text_mlp_router = None
        if config.text_mlp:
            self.text_mlp_router = timestep_router(self.attn.query_dim, self.groups, config, self.attn.to_q.weight)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Adapted from diffusers 0.42.1 FluxTransformerBlock.forward: masks inserted, no IP-adapter.
        attention_mask = _attention_mask(joint_attention_kwargs)
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attn_output, context_attn_output = joint_attention(
            self.attn, norm_hidden_states, norm_encoder_hidden_states, image_rotary_emb, attention_mask,
            _decision(self.head_router),
        )
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output

        token_mask = self._route_tokens(hidden_states, encoder_hidden_states, temb, attention_mask)
        norm_hidden_states = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_output = masked_feed_forward(self.ff, norm_hidden_states, self.mlp_router.decision)
        ff_output = gate_mlp.unsqueeze(1) * ff_output
        hidden_states = hidden_states + mask_tokens(ff_output, token_mask)

        norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context_ff_output = masked_feed_forward(
            self.ff_context, norm_encoder_hidden_states, _decision(self.text_mlp_router)
        )
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)

        self._remember(hidden_states, encoder_hidden_states.shape[1], token_mask)
        return encoder_hidden_states, hidden_states

    def last_macs(self) -> tuple[torch.Tensor, float] | None:
        """(per-sample MACs [B] of the last forward, full-width MACs), spec §5.3 FLUX double block."""
        if self._record is None:
            return None
        rec = self._record
        text = 1 if self.text_mlp_router is None else self.text_mlp_router.decision.mean(-1)
        dynamic = flops.flux_double_block_macs(
            **self._tokens, **self._full(), active_heads=rec["active_heads"],
            image_group_fraction=rec["group_fraction"], text_group_fraction=text,
            active_image_tokens=rec["active_image_tokens"],
        )
        return dynamic, float(flops.flux_double_block_macs(**self._tokens, **self._full()))


class DyFluxSingleTransformerBlock(_FluxBlockBase):
    """Dynamic `FluxSingleTransformerBlock`: heads and groups feed one fused proj_out (spec §9.3)."""

    def __init__(self, block: FluxSingleTransformerBlock, config: DynamicConfig, where: str):
        super().__init__()
        move_children(block, self)
        self._add_routers(self.attn, self.proj_mlp.out_features, config, where)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Adapted from diffusers 0.42.1 FluxSingleTransformerBlock.forward: masks inserted.
        attention_mask = _attention_mask(joint_attention_kwargs)
        text_seq_len = encoder_hidden_states.shape[1]
        token_mask = self._route_tokens(hidden_states, encoder_hidden_states, temb, attention_mask)
        image = hidden_states
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        mlp_hidden_states = self.act_mlp(mask_units(self.proj_mlp(norm_hidden_states), self.mlp_router.decision))
        attn_output = joint_attention(
            self.attn, norm_hidden_states, None, image_rotary_emb, attention_mask, _decision(self.head_router)
        )
        hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
        update = gate.unsqueeze(1) * self.proj_out(hidden_states)
        if token_mask is not None:  # text tokens always update; skipped image tokens get nothing (§9.3)
            text_rows = token_mask.new_ones(token_mask.shape[0], text_seq_len)
            update = mask_tokens(update, torch.cat([text_rows, token_mask], dim=1))
        hidden_states = residual + update
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)

        self._remember(image, text_seq_len, token_mask)
        encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
        return encoder_hidden_states, hidden_states

    def last_macs(self) -> tuple[torch.Tensor, float] | None:
        """(per-sample MACs [B] of the last forward, full-width MACs), spec §5.3 FLUX single block."""
        if self._record is None:
            return None
        dynamic = flops.flux_single_block_macs(**self._tokens, **self._full(), **self._record)
        return dynamic, float(flops.flux_single_block_macs(**self._tokens, **self._full()))
