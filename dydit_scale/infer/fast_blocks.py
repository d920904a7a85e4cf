"""Sliced versions of the dynamic blocks: only the active heads and MLP groups are computed (§2.5),
and the token-routed MLP runs on the kept tokens only (§3.3, §9.3).

`apply_schedule` switches each dynamic block's class to its fast subclass here. The forwards are the
masked forwards of `dydit_scale.models` with the mask products replaced by sliced weights; the TDW
masks come from the schedule (set as the routers' `decision`, so `flops_ratio` keeps working), the
token routers run live. Sliced weights are cached per unique mask combination of the block (per
step when TD-LoRA must be merged at this step's π), or in low-memory mode made in each block's forward
and dropped at its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb

from dydit_scale.dynamic.schedule import RouterSchedule
from dydit_scale.infer.export import ROLES
from dydit_scale.infer.sliced import Sliced, attend, kept_rows, slice_linear, unit_index
from dydit_scale.lora.td_lora import TDLoRALinear
from dydit_scale.models.adaln_block import DyAdaLNTransformerBlock
from dydit_scale.models.flux_blocks import DyFluxSingleTransformerBlock, DyFluxTransformerBlock

__all__ = ["FAST_BLOCKS", "FastAdaLNBlock", "FastFluxDoubleBlock", "FastFluxSingleBlock", "FastState"]

#: a sliced linear: (dim 0 rows | 1 columns, [(role, units, channels per unit, channel offset)])
SlicePlan = dict[str, tuple[int, list[tuple[str, int, int, int]]]]


@dataclass
class FastState:
    """What the fast model shares with its blocks: the schedule, the options, this forward's facts."""

    schedule: RouterSchedule
    low_memory: bool = False
    attention: str = "sdpa"
    mask_ids: dict[str, list[int]] = field(default_factory=dict)
    token_log: list[torch.Tensor | None] | None = None
    """Set to [] to record, per forward, how many blocks ran each image token's MLP, [B, N_image]."""

    def __post_init__(self) -> None:
        self.mask_ids = {name: self.schedule.unique_masks(name)[1].tolist() for name in self.schedule.masks}


class _FastBlock:
    """Step selection and the sliced-weight cache shared by the fast blocks."""

    heads: int
    head_dim: int
    hidden: int
    groups: int

    def setup_fast(self, name: str, state: FastState) -> None:
        object.__setattr__(self, "_fast", state)
        self._roles = {role: f"{name}.{attr}" for role, attr in ROLES.items() if getattr(self, attr, None) is not None}
        self._plan = self.slice_plan()
        self._merge_per_step = any(isinstance(self.get_submodule(path), TDLoRALinear) for path in self._plan)
        self._cache: dict[Any, dict[str, Sliced]] = {}
        self._step: tuple[Any, dict[str, torch.Tensor]] | None = None

    def slice_plan(self) -> SlicePlan:
        raise NotImplementedError

    def use_step(self, step: int) -> None:
        """Select the masks of `step` for the next forward (TD-LoRA: drop the previous step's merge)."""
        fast = self._fast
        masks = {role: fast.schedule.masks[router][step] for role, router in self._roles.items()}
        key: Any = tuple(fast.mask_ids[router][step] for router in self._roles.values())
        if self._merge_per_step:
            key = (step, key)
            if key not in self._cache:
                self._cache.clear()
        self._step = (key, masks)

    def _weights(self) -> dict[str, Sliced]:
        key, masks = self._step
        found = self._cache.get(key)
        if found is None:
            with torch.no_grad():
                found = {path: slice_linear(self.get_submodule(path), dim, self._index(parts, masks))
                         for path, (dim, parts) in self._plan.items()}
            self._cache[key] = found
        return found

    def _release(self) -> None:
        """End of a forward: low-memory mode drops the slices it made for this block (§7.4)."""
        if self._fast.low_memory:
            self._cache.clear()

    @staticmethod
    def _index(parts: list[tuple[str, int, int, int]], masks: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not any(role in masks for role, *_ in parts):
            return None
        return torch.cat([unit_index(masks.get(role, torch.ones(units, dtype=torch.bool)), size, offset)
                          for role, units, size, offset in parts])

    def _active(self, role: str, total: int) -> int:
        mask = self._step[1].get(role)
        return total if mask is None else int(mask.sum())

    def _log_tokens(self, token_mask: torch.Tensor | None, batch: int, image_tokens: int) -> None:
        """Add this block's MLP tokens [B, N_image] to the compute map (sample-major rows)."""
        log = self._fast.token_log
        if not log:
            return
        ran = (torch.ones(batch, image_tokens) if token_mask is None
               else token_mask.detach().float().cpu().reshape(batch, image_tokens))
        log[-1] = ran if log[-1] is None else log[-1] + ran


def _mlp(x: torch.Tensor, ff: torch.nn.Module, fc1: Sliced, fc2: Sliced) -> torch.Tensor:
    """diffusers FeedForward (GELU → dropout → fc2 → …) with sliced fc1 rows and fc2 columns."""
    hidden = ff.net[1](ff.net[0].gelu(F.linear(x, *fc1)))
    hidden = F.linear(hidden, *fc2)
    for module in ff.net[3:]:
        hidden = module(hidden)
    return hidden


def _routed_update(residual: torch.Tensor, rows: torch.Tensor | None, update_fn, x: torch.Tensor,
                   gate: torch.Tensor) -> torch.Tensor:
    """residual + gate ⊙ f(x) for the kept rows only (§3.3); skipped tokens get nothing.

    residual, x [R, N, C]; gate [R, 1, C]; `rows` flat kept indices (None: all).
    """
    if rows is None:
        return residual + gate * update_fn(x)
    r, n, c = x.shape
    update = gate[:, 0].index_select(0, rows // n) * update_fn(x.reshape(r * n, c).index_select(0, rows))
    return residual.reshape(r * n, -1).index_add(0, rows, update.to(residual.dtype)).view(residual.shape)


class FastAdaLNBlock(_FastBlock, DyAdaLNTransformerBlock):
    """Sliced PixArt-α / Latte block (`DyAdaLNTransformerBlock` with weights of the active units)."""

    def slice_plan(self) -> SlicePlan:
        plan: SlicePlan = {}
        attns = [("attn1", "heads", self.attn1)]
        if self.cross_head_router is not None:
            attns.append(("attn2", "cross_heads", self.attn2))
        for prefix, role, attn in attns:
            part = (role, attn.heads, attn.to_q.out_features // attn.heads, 0)
            plan.update({f"{prefix}.{p}": (0, [part]) for p in ("to_q", "to_k", "to_v")})
            plan[f"{prefix}.to_out.0"] = (1, [part])
        mlp = ("mlp", self.groups, self.hidden // self.groups, 0)
        return plan | {"ff.net.0.proj": (0, [mlp]), "ff.net.2": (1, [mlp])}

    def _attention(self, prefix: str, role: str, hidden: torch.Tensor, context: torch.Tensor | None,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Adapted from `models.adaln_block.masked_attention`: |𝓗| heads, W_O on their columns."""
        attn: Attention = getattr(self, prefix)
        w, heads = self._weights(), self._active(role, attn.heads)
        context = hidden if context is None else context
        batch, length = context.shape[:2]
        if attention_mask is not None:  # identical for every head: keep one, broadcast over |𝓗|
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])[:, :1]
        q, k, v = (F.linear(x, *w[f"{prefix}.{p}"]).view(batch, x.shape[1], heads, -1)
                   for p, x in (("to_q", hidden), ("to_k", context), ("to_v", context)))
        out = attend(q, k, v, attention_mask, self._fast.attention).flatten(2).to(q.dtype)
        out = attn.to_out[1](F.linear(out, *w[f"{prefix}.to_out.0"]))
        return out / attn.rescale_output_factor

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
        # Adapted from DyAdaLNTransformerBlock.forward (diffusers 0.42.1 BasicTransformerBlock, ada_norm_single).
        if cross_attention_kwargs:
            raise ValueError(f"dynamic blocks: cross_attention_kwargs {sorted(cross_attention_kwargs)} are not supported")
        batch_size = hidden_states.shape[0]
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
            if self.cross_head_router is None:
                attn_output = self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                         attention_mask=encoder_attention_mask)
            else:
                attn_output = self._attention("attn2", "cross_heads", hidden_states, encoder_hidden_states,
                                              encoder_attention_mask)
            hidden_states = attn_output + hidden_states

        token_mask = None if self.token_router is None else self.token_router(hidden_states)
        norm_hidden_states = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        w = self._weights()
        hidden_states = _routed_update(hidden_states, kept_rows(token_mask),
                                       lambda x: _mlp(x, self.ff, w["ff.net.0.proj"], w["ff.net.2"]),
                                       norm_hidden_states, gate_mlp)
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        self._record = self._counts(hidden_states, token_mask, context_tokens)
        self._log_adaln_tokens(token_mask, hidden_states.shape[:2])
        self._release()
        return hidden_states

    def _log_adaln_tokens(self, token_mask: torch.Tensor | None, rows_tokens: torch.Size) -> None:
        """Token masks in sample-major frame-then-position order (Latte temporal rows are positions)."""
        rows, tokens = rows_tokens
        batch = self._batch or rows
        if token_mask is not None and self.kind == "latte_temporal":
            token_mask = token_mask.reshape(batch, rows // batch, tokens).transpose(1, 2)
        self._log_tokens(token_mask, batch, rows // batch * tokens)


def _attention_mask(joint_attention_kwargs: dict[str, Any] | None) -> torch.Tensor | None:
    kwargs = joint_attention_kwargs or {}
    unknown = sorted(set(kwargs) - {"attention_mask"})
    if unknown:
        raise ValueError(f"dynamic FLUX blocks: joint_attention_kwargs {unknown} are not supported")
    return kwargs.get("attention_mask")


class _FastFluxBlock(_FastBlock):
    """Joint attention over the active heads (image and text projections share them, §9.2)."""

    def _joint_attention(self, hidden: torch.Tensor, encoder: torch.Tensor | None, rope: Any,
                         attention_mask: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Adapted from `models.flux.joint_attention` (diffusers 0.42.1 FluxAttnProcessor)."""
        attn, w = self.attn, self._weights()
        shape = (self._active("heads", attn.heads), attn.head_dim)

        def project(path: str, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, *w[f"attn.{path}"]).unflatten(-1, shape)

        query, key, value = (project(p, hidden) for p in ("to_q", "to_k", "to_v"))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder is not None:
            enc_query, enc_key, enc_value = (project(p, encoder) for p in ("add_q_proj", "add_k_proj", "add_v_proj"))
            query = torch.cat([attn.norm_added_q(enc_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(enc_key), key], dim=1)
            value = torch.cat([enc_value, value], dim=1)
        if rope is not None:
            query = apply_rotary_emb(query, rope, sequence_dim=1)
            key = apply_rotary_emb(key, rope, sequence_dim=1)
        out = attend(query, key, value, attention_mask, self._fast.attention).flatten(2, 3).to(query.dtype)
        if encoder is None:
            return out
        encoder_out, out = out.split_with_sizes([encoder.shape[1], out.shape[1] - encoder.shape[1]], dim=1)
        out = attn.to_out[1](F.linear(out, *w["attn.to_out.0"]))
        return out, F.linear(encoder_out, *w["attn.to_add_out"])


class FastFluxDoubleBlock(_FastFluxBlock, DyFluxTransformerBlock):
    """Sliced DyFLUX double-stream block: joint heads, image FFN groups on the kept tokens."""

    def slice_plan(self) -> SlicePlan:
        heads = ("heads", self.heads, self.head_dim, 0)
        rows = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
        plan: SlicePlan = {f"attn.{p}": (0, [heads]) for p in rows}
        plan |= {"attn.to_out.0": (1, [heads]), "attn.to_add_out": (1, [heads])}
        ffs = [("ff", "mlp")] + ([("ff_context", "text_mlp")] if self.text_mlp_router is not None else [])
        for prefix, role in ffs:
            part = (role, self.groups, self.hidden // self.groups, 0)
            plan |= {f"{prefix}.net.0.proj": (0, [part]), f"{prefix}.net.2": (1, [part])}
        return plan

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Adapted from DyFluxTransformerBlock.forward (diffusers 0.42.1 FluxTransformerBlock).
        attention_mask = _attention_mask(joint_attention_kwargs)
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attn_output, context_attn_output = self._joint_attention(
            norm_hidden_states, norm_encoder_hidden_states, image_rotary_emb, attention_mask
        )
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output

        token_mask = self._route_tokens(hidden_states, encoder_hidden_states, temb, attention_mask)
        norm_hidden_states = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        w = self._weights()
        hidden_states = _routed_update(hidden_states, kept_rows(token_mask),
                                       lambda x: _mlp(x, self.ff, w["ff.net.0.proj"], w["ff.net.2"]),
                                       norm_hidden_states, gate_mlp.unsqueeze(1))

        norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        if self.text_mlp_router is None:
            context_ff_output = self.ff_context(norm_encoder_hidden_states)
        else:
            context_ff_output = _mlp(norm_encoder_hidden_states, self.ff_context, w["ff_context.net.0.proj"],
                                     w["ff_context.net.2"])
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)

        self._remember(hidden_states, encoder_hidden_states.shape[1], token_mask)
        self._log_tokens(token_mask, *hidden_states.shape[:2])
        self._release()
        return encoder_hidden_states, hidden_states


class FastFluxSingleBlock(_FastFluxBlock, DyFluxSingleTransformerBlock):
    """Sliced DyFLUX single-stream block: the fused proj_out keeps the columns of the active heads and
    groups; a skipped image token runs neither proj_mlp nor proj_out (§9.3)."""

    def slice_plan(self) -> SlicePlan:
        heads = ("heads", self.heads, self.head_dim, 0)
        mlp = ("mlp", self.groups, self.hidden // self.groups, 0)
        plan: SlicePlan = {f"attn.{p}": (0, [heads]) for p in ("to_q", "to_k", "to_v")}
        fused_mlp = ("mlp", self.groups, self.hidden // self.groups, self.heads * self.head_dim)
        return plan | {"proj_mlp": (0, [mlp]), "proj_out": (1, [heads, fused_mlp])}

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Adapted from DyFluxSingleTransformerBlock.forward (diffusers 0.42.1 FluxSingleTransformerBlock).
        attention_mask = _attention_mask(joint_attention_kwargs)
        text_seq_len = encoder_hidden_states.shape[1]
        token_mask = self._route_tokens(hidden_states, encoder_hidden_states, temb, attention_mask)
        image = hidden_states
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        attn_output = self._joint_attention(norm_hidden_states, None, image_rotary_emb, attention_mask)
        routed = None
        if token_mask is not None:  # text tokens always update (§9.3)
            routed = torch.cat([token_mask.new_ones(token_mask.shape[0], text_seq_len), token_mask], dim=1)
        w = self._weights()

        def fused(x: torch.Tensor) -> torch.Tensor:  # x = [attention output | normed input]
            attn, norm = x.split_with_sizes([attn_output.shape[-1], x.shape[-1] - attn_output.shape[-1]], dim=-1)
            mlp = self.act_mlp(F.linear(norm, *w["proj_mlp"]))
            return F.linear(torch.cat([attn, mlp], dim=-1), *w["proj_out"])

        hidden_states = _routed_update(hidden_states, kept_rows(routed), fused,
                                       torch.cat([attn_output, norm_hidden_states], dim=-1), gate.unsqueeze(1))
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)

        self._remember(image, text_seq_len, token_mask)
        self._log_tokens(token_mask, *image.shape[:2])
        self._release()
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


#: dynamic block class -> its fast (sliced) subclass
FAST_BLOCKS = {
    DyAdaLNTransformerBlock: FastAdaLNBlock,
    DyFluxTransformerBlock: FastFluxDoubleBlock,
    DyFluxSingleTransformerBlock: FastFluxSingleBlock,
}
