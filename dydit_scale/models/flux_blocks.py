"""DyFLUX blocks: dynamic double- and single-stream FLUX blocks.

* Heads are joint: one head mask acts on the image (to_q/k/v, to_out) and text (add_q/k/v_proj,
  to_add_out) projections, because both streams share the heads of the joint attention.
* Double block: the image FFN is width-dynamic and token-routed (router after the attention
  residual); the text FFN is static unless `dynamic.text_mlp`.
* Single block: one fused proj_out(concat[attn (C), mlp (D)]); heads mask the attention part and
  groups the MLP part before it. The token router reads the block input; a skipped image token gets
  a zero residual update but still serves as key/value.

The forwards are written against the ops of `DynamicBlock`: masked here, sliced on the fast path.
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

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.masks import key_padding_mask, mask_units
from dydit_scale.dynamic.routers import ConditionedTokenRouter
from dydit_scale.dynamic.schedule import TokenShape
from dydit_scale.models.dynamic_block import DynamicBlock
from dydit_scale.models.dynamic_model import mlp_groups, move_children, timestep_router

__all__ = ["DyFluxSingleTransformerBlock", "DyFluxTransformerBlock"]

Rope = tuple[torch.Tensor, torch.Tensor] | None


def _attention_mask(joint_attention_kwargs: dict[str, Any] | None) -> torch.Tensor | None:
    """The only joint-attention kwarg the dynamic blocks accept: an SDPA `attention_mask`."""
    kwargs = joint_attention_kwargs or {}
    unknown = sorted(set(kwargs) - {"attention_mask"})
    if unknown:
        raise ValueError(f"dynamic FLUX blocks: joint_attention_kwargs {unknown} are not supported")
    return kwargs.get("attention_mask")


class _FluxBlockBase(DynamicBlock):
    """Routers, the diffusers signature, the joint attention and the token router of both FLUX blocks."""

    attn: FluxAttention

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

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: Rope = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusers block's signature and return value: (text, image) hidden states."""
        attention_mask = _attention_mask(joint_attention_kwargs)
        return self._streams(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_mask)

    def _streams(self, image: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, rope: Rope,
                 attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block itself, given the SDPA attention mask: (text, image) hidden states."""
        raise NotImplementedError

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """diffusers' attention dispatch with the backend of the block's processor, as `FluxAttnProcessor`."""
        processor = self.attn.processor
        return dispatch_attention_fn(query, key, value, attn_mask=mask, backend=processor._attention_backend,
                                     parallel_config=processor._parallel_config)

    def _joint_attention(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, rope: Rope,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """FLUX (joint) attention with the head mask before the output projections, so a masked head
        contributes nothing. Adapted from diffusers 0.42.1 `FluxAttnProcessor.__call__` (unfused
        projections)."""
        attn = self.attn

        def heads(path: str, x: torch.Tensor) -> torch.Tensor:
            return self._linear(f"attn.{path}", x).unflatten(-1, (-1, attn.head_dim))

        query, key, value = (heads(path, hidden_states) for path in ("to_q", "to_k", "to_v"))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:
            paths = ("add_q_proj", "add_k_proj", "add_v_proj")
            enc_query, enc_key, enc_value = (heads(path, encoder_hidden_states) for path in paths)
            query = torch.cat([attn.norm_added_q(enc_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(enc_key), key], dim=1)
            value = torch.cat([enc_value, value], dim=1)
        if rope is not None:
            query = apply_rotary_emb(query, rope, sequence_dim=1)
            key = apply_rotary_emb(key, rope, sequence_dim=1)
        out = self._attend(query, key, value, attention_mask)
        out = mask_units(out.flatten(2, 3).to(query.dtype), self._unit_mask("heads"))
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](self._linear("attn.to_out.0", out.contiguous()))
        return out, self._linear("attn.to_add_out", encoder_out.contiguous())

    def _route_tokens(
        self, image: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """SDT mask [B, N_i]; the text mean skips the padding keys of the attention mask, so padded
        prompts are scored like unpadded ones."""
        if self.token_router is None:
            return None
        text_mask = None if attention_mask is None else key_padding_mask(attention_mask, slice(0, text.shape[1]))
        return self.token_router(image, text, temb, text_mask)


class DyFluxTransformerBlock(_FluxBlockBase):
    """Dynamic `FluxTransformerBlock` (double stream): joint heads, image FFN with TDW + SDT."""

    kind = "flux_double"

    def __init__(self, block: FluxTransformerBlock, config: DynamicConfig, where: str):
        super().__init__()
        move_children(block, self)
        self._add_routers(self.attn, self.ff.net[0].proj.out_features, config, where)
        self.text_mlp_router = None
        if config.text_mlp:
            self.text_mlp_router = timestep_router(self.attn.query_dim, self.groups, config, self.attn.to_q.weight)

    def _streams(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                 rope: Rope, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Adapted from diffusers 0.42.1 FluxTransformerBlock.forward: masks inserted, no IP-adapter.
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attn_output, context_attn_output = self._joint_attention(
            norm_hidden_states, norm_encoder_hidden_states, rope, attention_mask
        )
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output

        token_mask = self._route_tokens(hidden_states, encoder_hidden_states, temb, attention_mask)
        norm_hidden_states = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = self._routed_update(hidden_states, token_mask, gate_mlp.unsqueeze(1), self._image_mlp,
                                            norm_hidden_states)

        norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context_ff_output = self._feed_forward("ff_context", "text_mlp", norm_encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)

        batch, image_tokens = hidden_states.shape[:2]
        self._end_forward(token_mask, batch, TokenShape(image_tokens, encoder_hidden_states.shape[1]))
        return encoder_hidden_states, hidden_states

    def _image_mlp(self, norm_hidden_states: torch.Tensor) -> torch.Tensor:
        return self._feed_forward("ff", "mlp", norm_hidden_states)


class DyFluxSingleTransformerBlock(_FluxBlockBase):
    """Dynamic `FluxSingleTransformerBlock`: heads and groups feed one fused proj_out."""

    kind = "flux_single"

    def __init__(self, block: FluxSingleTransformerBlock, config: DynamicConfig, where: str):
        super().__init__()
        move_children(block, self)
        self._add_routers(self.attn, self.proj_mlp.out_features, config, where)

    def _streams(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                 rope: Rope, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Adapted from diffusers 0.42.1 FluxSingleTransformerBlock.forward: masks inserted.
        text_seq_len = encoder_hidden_states.shape[1]
        token_mask = self._route_tokens(hidden_states, encoder_hidden_states, temb, attention_mask)
        batch, image_tokens = hidden_states.shape[:2]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        attn_output = self._joint_attention(norm_hidden_states, None, rope, attention_mask)
        routed = None
        if token_mask is not None:  # text tokens always update: only image tokens are routed
            routed = torch.cat([token_mask.new_ones(batch, text_seq_len), token_mask], dim=1)
        hidden_states = self._routed_update(residual, routed, gate.unsqueeze(1), self._fused_out, attn_output,
                                            norm_hidden_states)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)

        self._end_forward(token_mask, batch, TokenShape(image_tokens, text_seq_len))
        encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
        return encoder_hidden_states, hidden_states

    def _fused_out(self, attn_output: torch.Tensor, norm_hidden_states: torch.Tensor) -> torch.Tensor:
        """proj_out(concat[attention output, MLP hidden]) with the group mask before the activation."""
        mlp_hidden_states = self.act_mlp(mask_units(self._linear("proj_mlp", norm_hidden_states),
                                                    self._unit_mask("mlp")))
        return self._linear("proj_out", torch.cat([attn_output, mlp_hidden_states], dim=-1))
