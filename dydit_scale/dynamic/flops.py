"""Analytic MACs of DyDiT blocks and the per-sample FLOPs ratio of the last forward.

Everything is counted in multiply-accumulates (MACs, the DiT convention: DiT-XL/2 = 118.6 "GFLOPs").
Counted: the Q/K/V/O projections, the two attention matmuls QKᵀ and A·V, the MLP fc1/fc2.
Not counted in a block: softmax, norms, activations, adaLN modulation, routers; a whole DiT forward
with the embedders, modulation and final layer the papers count is :func:`dit_model_macs`.
The MLP is the plain two-matmul one (fc1 C → D, fc2 D → C); a gated MLP (GEGLU) is not covered.

Every count argument may be a Python number or an fp32 tensor [B] (active heads ĥ, group fraction
ĝ/G, active tokens ñ); the result is then a tensor [B] that stays differentiable with respect to
them, so the FLOPs loss reaches the routers through the straight-through masks. With Python ints
the results are exact ints.

Heads: ``heads`` is always the *total* head count H and ``active_heads`` the active count ĥ
(default H); the formulas depend on ĥ only. ``cross_heads`` (PixArt, Latte) is the *active*
cross-attention head count; None keeps cross-attention static at full width.

:func:`block_macs` is the one dispatch from a block kind (``LayerEntry.kind``) to its formula: the
dynamic blocks and the router schedules both count through it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import reduce

import torch
from torch import Tensor, nn

#: A count: a Python number, or a tensor [B] of per-sample values.
Count = int | float | Tensor

__all__ = [
    "BLOCK_KINDS", "Count", "active_units", "block_macs", "self_attention_macs", "cross_attention_macs",
    "mlp_macs", "flux_double_block_macs", "flux_single_block_macs", "pixart_block_macs",
    "latte_spatial_block_macs", "latte_temporal_block_macs", "dit_model_macs", "flops_ratio",
]

#: The block kinds :func:`block_macs` knows; a layer table's ``kind`` is one of them.
BLOCK_KINDS = ("flux_double", "flux_single", "dit", "pixart", "latte_spatial", "latte_temporal")
#: Roles whose mask counts active heads; the other roles (mlp, text_mlp) count kept group fractions.
HEAD_ROLES = ("heads", "cross_heads")


def _active(active: Count | None, total: Count) -> Count:
    """`active` if given, else `total`; Python numbers larger than `total` are an error."""
    if active is None:
        return total
    if not isinstance(active, Tensor) and not isinstance(total, Tensor) and active > total:
        raise ValueError(f"active count must not exceed the total {total}, got {active}")
    return active


def _hidden(width: int, mlp_ratio: float) -> int:
    """MLP hidden width D = ``int(dim * mult)`` as in diffusers, robust to ``mlp_ratio = D / C``.

    fl(D/C)·C can land just below D (D = 1, C = 49), so a product within 1e-9 of an integer is that
    integer.
    """
    product = width * mlp_ratio
    nearest = round(product)
    return nearest if math.isclose(product, nearest, rel_tol=1e-9) else int(product)


def self_attention_macs(
    *, tokens: Count, width: int, head_dim: int, heads: int, active_heads: Count | None = None
) -> Count:
    """Self-attention MACs per sample: ĥ·C_H·(4·C·N + 2·N²) (A = 4NC² + 2N²C at full width).

    Q/K/V project C → ĥC_H and O projects ĥC_H → C on all N tokens (4·N·C·ĥC_H); QKᵀ and A·V cost
    N²·ĥC_H each.
    """
    h = _active(active_heads, heads)
    return h * head_dim * (4 * width * tokens + 2 * tokens * tokens)


def cross_attention_macs(
    *, tokens: Count, context_tokens: Count, width: int, context_width: int | None = None, head_dim: int,
    heads: int, active_heads: Count | None = None,
) -> Count:
    """Cross-attention MACs per sample: ĥC_H·(2·C·N + 2·C_ctx·M + 2·N·M) (PixArt-α's text attention).

    Q and O act on the N tokens (width C), K and V on the M context tokens (width C_ctx, default C);
    the core costs 2·N·M·ĥC_H. At full width with C_ctx = C: 2NC² + 2MC² + 2NMC.
    """
    h = _active(active_heads, heads)
    ctx_width = width if context_width is None else context_width
    linear = 2 * width * tokens + 2 * ctx_width * context_tokens
    return h * head_dim * (linear + 2 * tokens * context_tokens)


def mlp_macs(*, width: int, hidden: int, tokens: Count, group_fraction: Count = 1) -> Count:
    """MLP MACs per sample: 2·C·D·(ĝ/G)·ñ (M = 8NC² at D = 4C, ĝ = G, ñ = N).

    ``tokens`` is the number of tokens that run the MLP (ñ after SDT), ``group_fraction`` ĝ/G.
    """
    return 2 * width * hidden * group_fraction * tokens


def flux_double_block_macs(
    *, image_tokens: int, text_tokens: int, width: int, head_dim: int, heads: int,
    image_group_fraction: Count = 1, text_group_fraction: Count = 1, active_image_tokens: Count | None = None,
    mlp_ratio: float = 4, active_heads: Count | None = None,
) -> Count:
    """FLUX double-stream block MACs per sample.

    Joint attention over N = N_i + N_t tokens, one head mask for both streams:
    ĥC_H·(4·C·N + 2·N²). Image FFN 2·C·D·(ĝ_i/G)·ñ_i (token-routed), text FFN 2·C·D·(ĝ_t/G)·N_t.
    Full width: 12C²N + 2N²C.
    """
    hidden = _hidden(width, mlp_ratio)
    attn = self_attention_macs(
        tokens=image_tokens + text_tokens, width=width, head_dim=head_dim, heads=heads,
        active_heads=active_heads,
    )
    image_ffn = mlp_macs(
        width=width, hidden=hidden, group_fraction=image_group_fraction,
        tokens=_active(active_image_tokens, image_tokens),
    )
    text_ffn = mlp_macs(width=width, hidden=hidden, group_fraction=text_group_fraction, tokens=text_tokens)
    return attn + image_ffn + text_ffn


def flux_single_block_macs(
    *, image_tokens: int, text_tokens: int, width: int, head_dim: int, heads: int, group_fraction: Count = 1,
    active_image_tokens: Count | None = None, mlp_ratio: float = 4, active_heads: Count | None = None,
) -> Count:
    """FLUX single-stream block MACs per sample.

    qkv = 3·C·ĥC_H·N and core = 2·N²·ĥC_H for all N tokens; proj_mlp = C·D·(ĝ/G)·ñ and the fused
    proj_out = C·(ĥC_H + D·ĝ/G)·ñ only for the ñ = N_t + ñ_i tokens that update the residual. A
    skipped image token saves proj_mlp and proj_out (9C² of 12C² at full width) but still pays its
    Q/K/V and core share. Full width: 12C²N + 2N²C.
    """
    tokens = image_tokens + text_tokens
    inner = _active(active_heads, heads) * head_dim
    routed = text_tokens + _active(active_image_tokens, image_tokens)
    mlp_inner = _hidden(width, mlp_ratio) * group_fraction
    qkv = 3 * width * inner * tokens
    core = 2 * tokens * tokens * inner
    proj_mlp = width * mlp_inner * routed
    proj_out = width * (inner + mlp_inner) * routed
    return qkv + core + proj_mlp + proj_out


def pixart_block_macs(
    *, tokens: Count, context_tokens: int, width: int, head_dim: int, heads: int, group_fraction: Count = 1,
    active_tokens: Count | None = None, cross_heads: Count | None = None, mlp_ratio: float = 4,
    active_heads: Count | None = None, context_width: int | None = None,
) -> Count:
    """PixArt-α block MACs per sample: self-attn + cross-attn to M_c tokens + MLP, i.e. a Latte
    spatial block of one frame. Without context tokens it is a DiT block: (ĥ/H)·A + (ĝ/G)·(ñ/N)·M.

    ``cross_heads`` is the active cross-attention head count (None: static, all ``heads``).
    """
    return latte_spatial_block_macs(
        frames=1, tokens_per_frame=tokens, context_tokens=context_tokens, width=width, head_dim=head_dim,
        heads=heads, group_fraction=group_fraction, active_tokens=active_tokens, cross_heads=cross_heads,
        mlp_ratio=mlp_ratio, active_heads=active_heads, context_width=context_width,
    )


def latte_spatial_block_macs(
    *, frames: int, tokens_per_frame: int, width: int, head_dim: int, heads: int, group_fraction: Count = 1,
    active_tokens: Count | None = None, context_tokens: int = 0, cross_heads: Count | None = None,
    mlp_ratio: float = 4, active_heads: Count | None = None, context_width: int | None = None,
) -> Count:
    """Latte spatial block MACs per clip: F·ĥC_H·(4·C·S + 2·S²) + MLP over ñ ≤ F·S.

    With ``context_tokens`` > 0 (T2V) each frame also cross-attends to the M context tokens as in
    PixArt-α; ``active_tokens`` counts over all F·S tokens of the clip. Attention always sees all
    tokens; SDT only shortens the MLP.
    """
    attn = frames * self_attention_macs(
        tokens=tokens_per_frame, width=width, head_dim=head_dim, heads=heads, active_heads=active_heads
    )
    if context_tokens:
        attn = attn + frames * cross_attention_macs(
            tokens=tokens_per_frame, context_tokens=context_tokens, width=width,
            context_width=context_width, head_dim=head_dim, heads=heads, active_heads=cross_heads,
        )
    mlp = mlp_macs(
        width=width, hidden=_hidden(width, mlp_ratio), group_fraction=group_fraction,
        tokens=_active(active_tokens, frames * tokens_per_frame),
    )
    return attn + mlp


def latte_temporal_block_macs(
    *, frames: int, tokens_per_frame: int, width: int, head_dim: int, heads: int, group_fraction: Count = 1,
    active_tokens: Count | None = None, mlp_ratio: float = 4, active_heads: Count | None = None,
) -> Count:
    """Latte temporal block MACs per clip: S·ĥC_H·(4·C·F + 2·F²) + MLP over ñ ≤ F·S."""
    attn = tokens_per_frame * self_attention_macs(
        tokens=frames, width=width, head_dim=head_dim, heads=heads, active_heads=active_heads
    )
    mlp = mlp_macs(
        width=width, hidden=_hidden(width, mlp_ratio), group_fraction=group_fraction,
        tokens=_active(active_tokens, frames * tokens_per_frame),
    )
    return attn + mlp


def dit_model_macs(*, depth: int, width: int, heads: int, patch_size: int = 2, latent_size: int = 32,
                   in_channels: int = 4, learn_sigma: bool = True, frequency_dim: int = 256) -> int:
    """MACs of one whole static DiT forward (class-conditional, adaLN-Zero), as the papers total them.

    On top of the blocks' attention and MLP matmuls this counts what the DiT and DyDiT tables
    include and the per-block formulas leave out: each block's adaLN modulation (C → 6C on one
    vector), the softmax (one per attention score), the patch embedding (p²·C_in → C per token), the
    timestep embedder (256 → C → C) and the final layer (adaLN C → 2C, then C → p²·C_out per token).
    Not counted: norms, activations, residual adds, modulation products and the label lookup. DiT-S/2,
    B/2 and XL/2 at 256² (32² latents) give 6.06 / 23.01 / 118.65 G against the paper's 6.07 / 23.02 /
    118.69.
    """
    tokens = (latent_size // patch_size) ** 2
    head_dim = width // heads
    block = (self_attention_macs(tokens=tokens, width=width, head_dim=head_dim, heads=heads)
             + mlp_macs(width=width, hidden=4 * width, tokens=tokens)
             + width * 6 * width + heads * tokens * tokens)
    out_channels = 2 * in_channels if learn_sigma else in_channels
    patch_embed = tokens * width * in_channels * patch_size**2
    timestep_embed = frequency_dim * width + width * width
    final = width * 2 * width + tokens * width * patch_size**2 * out_channels
    return depth * block + patch_embed + timestep_embed + final


def active_units(role: str, mask: Tensor) -> Tensor:
    """What :func:`block_macs` reads of a unit mask [..., U]: active heads for a head role, the kept
    fraction of groups for an MLP role."""
    return mask.sum(-1) if role in HEAD_ROLES else mask.mean(-1)


def block_macs(
    kind: str, *, heads: int, head_dim: int, hidden: int, image_tokens: int, text_tokens: int = 0, frames: int = 1,
    cross_heads: int = 0, context_width: int | None = None, active: Mapping[str, Count] | None = None,
) -> Count:
    """MACs per sample of one dynamic block of `kind` (one of :data:`BLOCK_KINDS`).

    The block's shape is that of its ``LayerEntry`` (``cross_heads`` 0: no cross-attention); the
    tokens are those of a ``TokenShape``: N image tokens (Latte: S per frame) of F ``frames``, and M
    text tokens, attended jointly (FLUX) or by the cross-attention. ``active`` holds, by role, what
    :func:`active_units` reads of the router masks (heads, cross_heads, mlp, text_mlp) and under
    ``tokens`` the image tokens per sample that run the MLP; a missing entry counts at full width.
    """
    active = active or {}
    width = heads * head_dim
    common = dict(width=width, head_dim=head_dim, heads=heads, mlp_ratio=hidden / width,
                  active_heads=active.get("heads"))
    if kind in ("flux_double", "flux_single"):
        tokens = dict(image_tokens=image_tokens, text_tokens=text_tokens, active_image_tokens=active.get("tokens"))
        if kind == "flux_single":
            return flux_single_block_macs(**tokens, **common, group_fraction=active.get("mlp", 1))
        return flux_double_block_macs(**tokens, **common, image_group_fraction=active.get("mlp", 1),
                                      text_group_fraction=active.get("text_mlp", 1))
    common |= dict(group_fraction=active.get("mlp", 1), active_tokens=active.get("tokens"))
    if kind == "latte_temporal":
        return latte_temporal_block_macs(frames=frames, tokens_per_frame=image_tokens, **common)
    context = dict(context_tokens=text_tokens if cross_heads else 0, cross_heads=active.get("cross_heads"),
                   context_width=context_width)
    if kind in ("dit", "pixart"):  # a DiT block is a PixArt-α block without cross-attention
        return pixart_block_macs(tokens=image_tokens, **context, **common)
    if kind == "latte_spatial":
        return latte_spatial_block_macs(frames=frames, tokens_per_frame=image_tokens, **context, **common)
    raise ValueError(f"block_macs: unknown block kind {kind!r}; expected one of {', '.join(BLOCK_KINDS)}")


def _dynamic_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules defining ``last_macs``, outermost first; their descendants are not visited.

    A block reports the MACs of everything inside it, so a nested implementer is never counted twice.
    """
    found: list[tuple[str, nn.Module]] = []
    skip: str | None = None
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if callable(getattr(module, "last_macs", None)):
            found.append((name, module))
            skip = f"{name}." if name else ""
    return found


def flops_ratio(model: nn.Module) -> Tensor:
    """Per-sample FLOPs ratio r_b of the last forward, fp32 [B].

    r_b = Σ_blocks dynamic MACs_b / Σ_blocks full-width MACs, over every module that implements
    ``last_macs()`` → (per-sample MACs [B] of the last forward, full-width MACs), or None before any
    forward. Differentiable through the per-block dynamic MACs.
    """
    modules = _dynamic_modules(model)
    if not modules:
        raise ValueError(
            f"flops_ratio: {type(model).__name__} has no dynamic blocks (no module defines last_macs())"
        )
    dynamic: list[Tensor] = []
    full = 0.0
    for name, module in modules:
        macs = module.last_macs()
        if macs is None:
            raise RuntimeError(
                f"flops_ratio: block {name or '<root>'} ({type(module).__name__}) has no MACs "
                "recorded; run a forward of the dynamic model first"
            )
        dynamic.append(torch.as_tensor(macs[0], dtype=torch.float32))
        full += float(macs[1])
    if full <= 0:
        raise ValueError(f"flops_ratio: total full-width MACs must be positive, got {full}")
    total = reduce(lambda acc, macs: acc + macs.to(acc.device), dynamic)
    if total.dim() != 1:
        raise ValueError(f"flops_ratio: expected per-sample MACs of shape [B], got {tuple(total.shape)}")
    return total / full
