"""Dynamic `BasicTransformerBlock` with adaLN modulation, shared by DiT, PixArt-α and Latte.

DiT blocks use `ada_norm_zero` (each block maps its own timestep + class embedding to the six
modulation vectors), PixArt-α and Latte `ada_norm_single` (one shared embedding, a per-block table).

Order of operations: self-attention with the head mask before W_O → cross-attention (static unless
`dynamic.cross_attention`, then its own head router) → the DiT-style token router on the residual
stream → FFN with the group mask before GELU, the token mask on the gated output.
Block rows may be several per sample (Latte: B·F spatial, B·S temporal, sample-major); per-sample
TDW masks are repeated to the rows, token masks are per row.
The forward is written against the ops of `DynamicBlock`: masked here, sliced on the fast path.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.importance import PermutedSpan, UnitSlice, permute_block
from dydit_scale.dynamic.masks import mask_units
from dydit_scale.dynamic.routers import TokenRouter
from dydit_scale.dynamic.schedule import TokenShape
from dydit_scale.models.dynamic_block import DynamicBlock
from dydit_scale.models.dynamic_model import check_feed_forward, mlp_groups, move_children, timestep_router

__all__ = ["BlockKind", "DyAdaLNTransformerBlock", "check_adaln_block", "head_parts", "permute_adaln_block"]

#: dit: DiT / SiT block (ada_norm_zero, no cross-attention); pixart: PixArt-α block;
#: latte_spatial: rows B·F, tokens S; latte_temporal: rows B·S, tokens F.
BlockKind = Literal["dit", "pixart", "latte_spatial", "latte_temporal"]


class DyAdaLNTransformerBlock(DynamicBlock):
    """Dynamic DiT / PixArt-α / Latte block: TDW over self-attention heads (and optionally
    cross-attention heads) and FFN groups, SDT before the FFN."""

    def __init__(self, block: BasicTransformerBlock, config: DynamicConfig, kind: BlockKind, where: str):
        super().__init__()
        move_children(block, self)
        self.attn2: Attention | None = getattr(block, "attn2", None)
        self.kind = kind
        width, like = block.dim, self.attn1.to_q.weight
        self.heads, self.head_dim = self.attn1.heads, self.attn1.to_q.out_features // self.attn1.heads
        self.hidden = self.ff.net[0].proj.out_features
        if self.attn2 is not None:
            self.cross_heads, self.context_width = self.attn2.heads, self.attn2.to_k.in_features
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

    def last_macs(self) -> tuple[torch.Tensor, float] | None:
        """As `DynamicBlock.last_macs`; a block prepared but not run (Latte with
        enable_temporal_attentions=False) counts nothing."""
        if self._record is None and self._batch is not None:
            return torch.zeros(self._batch), 0.0
        return super().last_macs()

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
        # Adapted from diffusers 0.42.1 BasicTransformerBlock.forward, norm_type "ada_norm_single" and
        # "ada_norm_zero" (DiT: the modulation comes from the block's own timestep + class embedding).
        if cross_attention_kwargs:
            unknown = sorted(cross_attention_kwargs)
            raise ValueError(f"dynamic blocks: cross_attention_kwargs {unknown} are not supported")
        batch_size = hidden_states.shape[0]
        if self.kind == "dit":
            norm_hidden_states, *modulation = self.norm1(hidden_states, timestep, class_labels,
                                                         hidden_dtype=hidden_states.dtype)
            gate_msa, shift_mlp, scale_mlp, gate_mlp = (m[:, None] for m in modulation)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                self.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)
            ).chunk(6, dim=1)
            norm_hidden_states = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        attn_output = self._attention("attn1", "heads", norm_hidden_states, None, attention_mask)
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
                attn_output = self._attention(
                    "attn2", "cross_heads", hidden_states, encoder_hidden_states, encoder_attention_mask
                )
            hidden_states = attn_output + hidden_states

        token_mask = None if self.token_router is None else self.token_router(hidden_states)
        ff_norm = self.norm3 if self.kind == "dit" else self.norm2  # the FFN norm, as diffusers names it
        norm_hidden_states = ff_norm(hidden_states) * (1 + scale_mlp) + shift_mlp
        hidden_states = self._routed_update(hidden_states, token_mask, gate_mlp, self._mlp, norm_hidden_states)
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)

        self._end_forward(token_mask, *self._token_shape(hidden_states, context_tokens))
        return hidden_states

    def _mlp(self, norm_hidden_states: torch.Tensor) -> torch.Tensor:
        return self._feed_forward("ff", "mlp", norm_hidden_states)

    def _token_shape(self, hidden_states: torch.Tensor, context_tokens: int) -> tuple[int, TokenShape]:
        """(samples, tokens per sample) of block rows [R, N, C]: a Latte temporal block's rows are the
        positions of a frame and its tokens the frames; the other kinds' rows are frames."""
        rows, tokens = hidden_states.shape[:2]
        batch = self._batch or rows
        per_sample = rows // batch
        if self.kind == "latte_temporal":
            return batch, TokenShape(image_tokens=per_sample, text_tokens=context_tokens, frames=tokens)
        return batch, TokenShape(image_tokens=tokens, text_tokens=context_tokens, frames=per_sample)

    def _attention(self, prefix: str, role: str, hidden_states: torch.Tensor,
                   encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention with the head mask of `role` before W_O, so a masked head contributes nothing.

        Adapted from diffusers 0.42.1 `AttnProcessor2_0.__call__` for 3-D inputs and the plain
        `Attention` that `check_adaln_block` admits (no norms, no residual, unfused projections).
        """
        attn: Attention = getattr(self, prefix)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length = context.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        head_dim = attn.to_q.out_features // attn.heads
        inputs = (("to_q", hidden_states), ("to_k", context), ("to_v", context))
        query, key, value = (self._linear(f"{prefix}.{p}", x).unflatten(-1, (-1, head_dim)) for p, x in inputs)
        out = self._attend(query, key, value, attention_mask).flatten(2).to(query.dtype)
        out = attn.to_out[1](self._linear(f"{prefix}.to_out.0", mask_units(out, self._unit_mask(role))))
        return out / attn.rescale_output_factor


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
    if (block.norm_type not in ("ada_norm_single", "ada_norm_zero") or block.only_cross_attention
            or block.pos_embed is not None):
        raise ValueError(f"make_dynamic: {where} must be an ada_norm_single (PixArt-α / Latte) or ada_norm_zero "
                         f"(DiT) BasicTransformerBlock, got norm_type {block.norm_type!r}")
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
