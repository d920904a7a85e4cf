"""Sliced versions of the dynamic blocks: only the active heads and MLP groups are computed, and the
token-routed MLP runs on the kept tokens only.

`apply_schedule` switches each dynamic block's class to its fast subclass here. The forwards are the
dynamic blocks' own (`dydit_scale.models`); the subclasses override their ops: `_linear` with the
sliced weights, `_unit_mask` with nothing (the weights are already sliced), `_attend` with the chosen
backend, `_routed_update` with a gather / scatter of the kept tokens. The TDW masks come from the
schedule (set as the routers' `decision`, so `flops_ratio` keeps working), the token routers run
live. Sliced weights are cached per unique mask combination of the block (per step when TD-LoRA must
be merged at this step's π), least recently used first out once the cache would hold more than one
extra copy of the block's weights (a schedule whose every step is a new mask would otherwise keep a
copy per step: about 1 GB more per step for DiT-XL/2), or in low-memory mode made in each block's
forward and dropped at its end.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dydit_scale.dynamic.schedule import RouterSchedule, TokenShape
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


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _FastBlock:
    """Step selection, the sliced-weight cache and the sliced ops shared by the fast blocks (mixed in
    before a dynamic block class)."""

    heads: int
    head_dim: int
    hidden: int
    groups: int
    kind: str

    def setup_fast(self, name: str, state: FastState) -> None:
        object.__setattr__(self, "_fast", state)
        self._roles = self.layer_entry(name).routers
        self._plan = self.slice_plan()
        self._merge_per_step = any(isinstance(self.get_submodule(path), TDLoRALinear) for path in self._plan)
        self._cache: OrderedDict[Any, dict[str, Sliced]] = OrderedDict()
        self._cache_bytes: dict[Any, int] = {}
        self._cache_budget = sum(_nbytes(self.get_submodule(path).parameters()) for path in self._plan)
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
                self._drop_cache()
        self._step = (key, masks)

    def _weights(self) -> dict[str, Sliced]:
        key, masks = self._step
        found = self._cache.get(key)
        if found is None:
            with torch.no_grad():
                found = {path: slice_linear(self.get_submodule(path), dim, self._index(parts, masks))
                         for path, (dim, parts) in self._plan.items()}
            self._cache[key], self._cache_bytes[key] = found, self._copied_bytes(found)
            while len(self._cache) > 1 and sum(self._cache_bytes.values()) > self._cache_budget:
                del self._cache_bytes[self._cache.popitem(last=False)[0]]
        self._cache.move_to_end(key)
        return found

    def _drop_cache(self) -> None:
        self._cache.clear()
        self._cache_bytes.clear()

    def _copied_bytes(self, weights: dict[str, Sliced]) -> int:
        """Bytes a cache entry holds beyond the modules' own parameters (an unsliced weight is shared)."""
        own = {p.data_ptr() for path in weights for p in self.get_submodule(path).parameters()}
        return _nbytes(t for pair in weights.values() for t in pair if t is not None and t.data_ptr() not in own)

    @staticmethod
    def _index(parts: list[tuple[str, int, int, int]], masks: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not any(role in masks for role, *_ in parts):
            return None
        return torch.cat([unit_index(masks.get(role, torch.ones(units, dtype=torch.bool)), size, offset)
                          for role, units, size, offset in parts])

    # ------------------------------------------------------------------ ops (sliced)
    def _linear(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """The sliced weights of a planned projection; any other one is the module itself."""
        sliced = self._weights().get(path)
        return super()._linear(path, x) if sliced is None else F.linear(x, *sliced)

    def _unit_mask(self, role: str) -> torch.Tensor | None:
        """Nothing to multiply: the inactive units' weights are not there."""
        return None

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        return attend(query, key, value, mask, self._fast.attention)

    def _routed_update(self, residual: torch.Tensor, token_mask: torch.Tensor | None, gate: torch.Tensor,
                       update: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """residual + gate ⊙ update(*inputs) for the kept rows only; skipped tokens get nothing.

        residual and inputs [R, N, ·], gate [R, 1, C]; the kept rows are gathered flat, [K, ·].
        """
        rows = kept_rows(token_mask)
        if rows is None:
            return residual + gate * update(*inputs)
        r, n = residual.shape[:2]
        kept = [x.reshape(r * n, -1).index_select(0, rows) for x in inputs]
        delta = gate[:, 0].index_select(0, rows // n) * update(*kept)
        return residual.reshape(r * n, -1).index_add(0, rows, delta.to(residual.dtype)).view(residual.shape)

    def _end_forward(self, token_mask: torch.Tensor | None, batch: int, shape: TokenShape) -> None:
        """Log the tokens that ran the MLP; low-memory mode drops the slices made for this forward."""
        super()._end_forward(token_mask, batch, shape)
        log = self._fast.token_log
        if log:
            ran = self._token_map(token_mask, batch, shape)
            log[-1] = ran if log[-1] is None else log[-1] + ran
        if self._fast.low_memory:
            self._drop_cache()

    def _token_map(self, token_mask: torch.Tensor | None, batch: int, shape: TokenShape) -> torch.Tensor:
        """Which image tokens ran the MLP, [B, F·N] in frame-then-position order (sample-major rows)."""
        if token_mask is None:
            return torch.ones(batch, shape.frames * shape.image_tokens)
        ran = token_mask.detach().float().cpu()
        if self.kind == "latte_temporal":  # rows are positions, tokens are frames
            ran = ran.reshape(batch, shape.image_tokens, shape.frames).transpose(1, 2)
        return ran.reshape(batch, -1)


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

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """The prepared mask [B, H, …] is the same for every head: keep one, broadcast over the active ones."""
        return super()._attend(query, key, value, None if mask is None else mask[:, :1])


class FastFluxDoubleBlock(_FastBlock, DyFluxTransformerBlock):
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


class FastFluxSingleBlock(_FastBlock, DyFluxSingleTransformerBlock):
    """Sliced DyFLUX single-stream block: the fused proj_out keeps the columns of the active heads and
    groups; a skipped image token runs neither proj_mlp nor proj_out."""

    def slice_plan(self) -> SlicePlan:
        heads = ("heads", self.heads, self.head_dim, 0)
        mlp = ("mlp", self.groups, self.hidden // self.groups, 0)
        plan: SlicePlan = {f"attn.{p}": (0, [heads]) for p in ("to_q", "to_k", "to_v")}
        fused_mlp = ("mlp", self.groups, self.hidden // self.groups, self.heads * self.head_dim)
        return plan | {"proj_mlp": (0, [mlp]), "proj_out": (1, [heads, fused_mlp])}


#: dynamic block class -> its fast (sliced) subclass
FAST_BLOCKS = {
    DyAdaLNTransformerBlock: FastAdaLNBlock,
    DyFluxTransformerBlock: FastFluxDoubleBlock,
    DyFluxSingleTransformerBlock: FastFluxSingleBlock,
}
