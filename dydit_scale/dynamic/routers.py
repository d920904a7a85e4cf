"""DyDiT routers: Gumbel-sigmoid masks for heads, channel groups (TDW) and tokens (SDT).

The routers of Eq. (3) (TDW) and Eq. (5) (SDT) of the DyDiT paper. Every router turns fp32
logits z into a straight-through mask m + (s − stopgrad(s)): forward = hard m ∈ {0, 1}, backward =
∂s/∂z with s = σ((z + noise)/τ). Training adds logistic noise (the difference of two Gumbels), so
m ~ Bernoulli(σ(z)) whatever τ; eval is the deterministic 1[z > 0] (the paper's 0.5 threshold).
Each router keeps its last mask in `decision` for the FLOPs accounting of `dydit_scale.dynamic.flops`.

Per-forward protocol. A dynamic transformer computes the pure timestep embedding e_t [B, C] once per
forward and calls `broadcast_timestep(model, e_t)` *before* its blocks run (outside any activation
checkpointing). Every submodule with a `prepare_step(timestep_embedding)` method is called:
timestep routers sample their masks there (they depend on t only), token routers snapshot the
complete-row / full-width request of this forward. A block recomputed by checkpointing therefore
sees the same masks: TDW masks are attributes set before the block ran, and token-router
noise is drawn inside the block under torch's RNG-state preservation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dydit_scale.dynamic.masks import expand_rows

__all__ = [
    "NOISE_BOUND",
    "ConditionedTokenRouter",
    "ForwardState",
    "Router",
    "router_parameters",
    "TimestepRouter",
    "TokenRouter",
    "broadcast_timestep",
    "complete_rows",
    "full_width",
    "gumbel_sigmoid",
]

# torch.rand draws multiples of 2**-24 in [0, 1); clamping keeps the logistic noise finite (±16.6).
_UNIFORM_EPS = 2.0**-24
#: The largest |logistic noise| that can be drawn: a logit above it is kept in training for sure.
NOISE_BOUND = math.log((1.0 - _UNIFORM_EPS) / _UNIFORM_EPS)


def gumbel_sigmoid(logits: torch.Tensor, tau: float, training: bool) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid mask, computed in fp32 so that the soft value σ(z/τ), which
    carries the straight-through gradient, is not rounded to bf16.

    g₁ − g₂ of two Gumbel(0, 1) draws is Logistic(0, 1), sampled here as log u − log(1 − u).
    """
    logits = logits.float()
    if training:
        u = torch.rand_like(logits).clamp_(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
        logits = logits + (torch.log(u) - torch.log1p(-u))
    soft = torch.sigmoid(logits / tau)
    hard = (soft > 0.5).to(soft.dtype)
    # (soft − soft.detach()) is exactly 0 in the forward pass, so the mask is exactly hard.
    return hard + (soft - soft.detach())


class Float32Linear(nn.Linear):
    """A Linear evaluated in fp32 whatever the module dtype (router logits stay fp32).

    Routers call it as a module, never reach for its `.weight` from a parent, so ZeRO-3 gathers
    its partitioned parameters in its own forward hook.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class Float32LayerNorm(nn.LayerNorm):
    """A LayerNorm evaluated in fp32 (same reason as `Float32Linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class ForwardState:
    """Mixin for modules that keep facts of their last forward (masks, counts) in the attributes
    named by `_per_forward`. Those tensors carry autograd graphs, which `copy.deepcopy` refuses, so
    copies and pickles (EMA models, checkpoints of the module object) leave them out."""

    _per_forward: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # nn.Module's, for the classes mixing this in
        state.update(dict.fromkeys(self._per_forward))
        return state


class Router(ForwardState, nn.Module):
    """Shared mask logic: sampling, full-width bypass, complete rows, and the last decision.

    `bypass` (set by `full_width`) and `complete_request` (set by `complete_rows`) are requests;
    `prepare_step` snapshots them at the start of a forward so that a checkpointed recomputation
    after the context manager exited still produces the same masks.
    """

    _per_forward = ("decision", "_forced")

    def __init__(self, tau: float):
        super().__init__()
        self.tau = tau
        self.bypass = False
        self.complete_request: torch.Tensor | None = None
        self._forced: torch.Tensor | bool | None = None
        self.decision: torch.Tensor | None = None

    def prepare_step(self, timestep_embedding: torch.Tensor) -> None:
        """Snapshot this forward's bypass / complete-row request ([B] bool, True = all ones)."""
        request = self.complete_request
        if request is not None and tuple(request.shape) != (timestep_embedding.shape[0],):
            raise ValueError(
                f"complete_rows: expected a bool mask of shape [{timestep_embedding.shape[0]}] "
                f"(one entry per sample), got {list(request.shape)}"
            )
        self._forced = True if self.bypass else request

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Sample a mask from logits [R, ...]; rows forced complete get all ones (warm-up)."""
        if self._forced is True:
            mask = torch.ones_like(logits, dtype=torch.float32)
        else:
            mask = gumbel_sigmoid(logits, self.tau, self.training)
            if self._forced is not None:
                rows = expand_rows(self._forced.to(mask.device, torch.bool), logits.shape[0])
                rows = rows.view(-1, *([1] * (logits.dim() - 1)))
                mask = torch.where(rows, torch.ones_like(mask), mask)
        self.decision = mask
        return mask


class TimestepRouter(Router):
    """TDW router R(e_t) = Linear(C → U − 1) on the pure timestep embedding (Eq. (3)).

    Unit 0 (the most important head / group after magnitude ranking) is always on; the mask of the
    current forward, [B, U], is `decision`, sampled once per forward in `prepare_step`.
    """

    def __init__(self, cond_dim: int, units: int, *, tau: float, bias: float):
        super().__init__(tau)
        self.units = units
        self.proj = Float32Linear(cond_dim, units - 1)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.constant_(self.proj.bias, bias)

    def prepare_step(self, timestep_embedding: torch.Tensor) -> None:
        """Sample this forward's mask from e_t [B, C]."""
        super().prepare_step(timestep_embedding)
        self(timestep_embedding)

    def forward(self, timestep_embedding: torch.Tensor) -> torch.Tensor:
        """Mask [B, U] for e_t [B, C]; column 0 ≡ 1."""
        sampled = self._mask(self.proj(timestep_embedding))
        mask = torch.cat([torch.ones_like(sampled[:, :1]), sampled], dim=1)
        self.decision = mask
        return mask


class TokenRouter(Router):
    """DiT-style SDT router Linear(C → C/16) → ReLU → Linear(C/16 → 1), token-wise (Eq. (5)).

    Init deviates from the official Xavier output weight: it is zero, so the logit is exactly
    the bias whatever the scale of the residual stream it reads (large activations would otherwise
    drop tokens of a fresh model). The weight still gets gradients, as a LoRA B = 0 does.
    """

    def __init__(self, width: int, *, tau: float, bias: float):
        super().__init__(tau)
        hidden = max(1, width // 16)
        self.fc1 = Float32Linear(width, hidden)
        self.fc2 = Float32Linear(hidden, 1)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Token mask [R, N] for the residual stream [R, N, C] after attention, before the MLP."""
        logits = self.fc2(F.relu(self.fc1(hidden_states)))
        return self._mask(logits.squeeze(-1))


class ConditionedTokenRouter(Router):
    """DyFLUX token router: image tokens scored with timestep and text context (official DyFLUX).

    SiLU(temb) → Linear(C → 4C) gives shift/scale for image and text; one learnable LayerNorm is
    shared; the text stream is mean-pooled over its real tokens (padding excluded when a key mask
    is given; the official router averages the padded T5 tokens too) and added to every image
    token; Linear(C → 1) scores each image token. Its weight starts at zero as in `TokenRouter`,
    so a fresh router's logit is the bias: eval keeps every token for any bias > 0, training for
    any bias above `NOISE_BOUND` (16.6).
    """

    def __init__(self, width: int, *, tau: float, bias: float):
        super().__init__(tau)
        self.condition = Float32Linear(width, 4 * width)
        self.norm = Float32LayerNorm(width, eps=1e-5)
        self.score = Float32Linear(width, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.constant_(self.score.bias, bias)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token mask [B, N_i] from image [B, N_i, C], text [B, N_t, C], temb [B, C], text_mask [B, N_t]."""
        shift_x, scale_x, shift_t, scale_t = self.condition(F.silu(temb.float())).chunk(4, dim=-1)
        image = self.norm(image) * (1 + scale_x[:, None]) + shift_x[:, None]
        text = self.norm(text) * (1 + scale_t[:, None]) + shift_t[:, None]
        if text_mask is None:
            pooled = text.mean(dim=1, keepdim=True)
        else:
            weight = text_mask.to(text.dtype)[..., None]
            pooled = (text * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(1.0)
        return self._mask(self.score(image + pooled).squeeze(-1))


def broadcast_timestep(model: nn.Module, timestep_embedding: torch.Tensor) -> None:
    """Call `prepare_step(e_t)` on every submodule that has one (routers, blocks, TD-LoRA gates).

    Run once per forward before the blocks, outside activation checkpointing, so that a block's
    checkpointed recomputation sees the masks of its first run.
    """
    for module in model.modules():
        if module is not model and callable(getattr(module, "prepare_step", None)):
            module.prepare_step(timestep_embedding)


def _routers(model: nn.Module) -> list[Router]:
    return [module for module in model.modules() if isinstance(module, Router)]


def router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of every router (timestep and token) of `model`, by qualified name.

    Found by module type, not by name, so an adapter or user layer called "router" is never caught.
    """
    found = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Router):
            for name, param in module.named_parameters(prefix=prefix):
                found[name] = param
    return found


@contextlib.contextmanager
def full_width(model: nn.Module) -> Iterator[nn.Module]:
    """Bypass every router of `model`: all heads, groups and tokens active.

    Applies to forwards started inside the `with` block; their checkpointed recomputation keeps it.
    """
    routers = _routers(model)
    previous = [router.bypass for router in routers]
    for router in routers:
        router.bypass = True
    try:
        yield model
    finally:
        for router, bypass in zip(routers, previous):
            router.bypass = bypass


@contextlib.contextmanager
def complete_rows(model: nn.Module, rows: torch.Tensor) -> Iterator[nn.Module]:
    """Force all masks to 1 for the samples where `rows` [B] is True (complete-model warm-up).

    Two forwards before one backward are fragile under ZeRO-3, so stage 1 runs one forward on
    [x_t; x_t] with rows = [False]*B + [True]*B, then splits the output: the second half is the
    complete model (same weights, routers bypassed) with no second forward before the backward.
    FLOPs of the complete rows are full; take the FLOPs ratio of the dynamic rows only.
    """
    routers = _routers(model)
    previous = [router.complete_request for router in routers]
    for router in routers:
        router.complete_request = rows.to(torch.bool)
    try:
        yield model
    finally:
        for router, request in zip(routers, previous):
            router.complete_request = request
