"""Analytic MACs against the official constants, torch's FlopCounterMode and autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dydit_scale.dynamic.flops import (
    BLOCK_KINDS,
    block_macs,
    cross_attention_macs,
    dit_model_macs,
    flops_ratio,
    flux_double_block_macs,
    flux_single_block_macs,
    latte_spatial_block_macs,
    latte_temporal_block_macs,
    mlp_macs,
    pixart_block_macs,
    self_attention_macs,
)
from dydit_scale.models.tiny import tiny_transformer

# --------------------------------------------------------------------------- official constants


@pytest.mark.parametrize(
    ("layers", "width", "heads", "attn_macs", "mlp_macs_", "total_gmacs"),
    [
        (12, 384, 6, 201_326_592, 301_989_888, 6.04),  # DiT-S/2
        (12, 768, 12, 704_643_072, 1_207_959_552, 22.95),  # DiT-B/2
        (28, 1152, 16, 1_509_949_440, 2_717_908_992, 118.38),  # DiT-XL/2
    ],
)
def test_dit_block_macs_match_official_constants(layers, width, heads, attn_macs, mlp_macs_, total_gmacs):
    """A and M per block (the official DiT loss.py constants), exact; L·(A+M) to 0.01 G. A DiT block is
    the pixart formula without cross-attention."""
    head_dim = width // heads
    attn = self_attention_macs(tokens=256, width=width, head_dim=head_dim, heads=heads)
    mlp = mlp_macs(width=width, hidden=4 * width, group_fraction=1, tokens=256)
    block = block_macs("pixart", heads=heads, head_dim=head_dim, hidden=4 * width, image_tokens=256)
    assert (attn, mlp, block) == (attn_macs, mlp_macs_, attn_macs + mlp_macs_)
    assert round(layers * block / 1e9, 2) == total_gmacs


@pytest.mark.parametrize(("depth", "width", "heads", "paper_gflops"),
                         [(12, 384, 6, 6.07), (12, 768, 12, 23.02), (28, 1152, 16, 118.69)])
def test_whole_dit_forward_reproduces_the_papers_gflops(depth, width, heads, paper_gflops):
    """DiT-S/2, B/2, XL/2 at 256²: the totals the DiT and DyDiT papers print, within 0.2 %."""
    macs = dit_model_macs(depth=depth, width=width, heads=heads)
    assert abs(macs / 1e9 / paper_gflops - 1) < 0.002


def test_whole_dit_count_matches_torch_flop_counter_on_the_diffusers_model():
    """Every matmul and conv term of `dit_model_macs`, checked against torch's own counter on
    diffusers' DiT-S/2 (learned σ; attention in the math kernel, which the counter sees). The counter
    has no softmax; diffusers computes the timestep embedding in every block and again for the final
    layer, where the official DiT computes it once."""
    from diffusers import DiTTransformer2DModel

    depth, width, heads, tokens = 12, 384, 6, 256
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4,
                                  out_channels=8, num_layers=depth, sample_size=32, patch_size=2,
                                  num_embeds_ada_norm=1000).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 4, 32, 32), timestep=torch.tensor([10]), class_labels=torch.tensor([3]))
    softmax = depth * heads * tokens * tokens
    timestep_embed = 256 * width + width * width
    expected = dit_model_macs(depth=depth, width=width, heads=heads) - softmax + depth * timestep_embed
    assert counter.get_total_flops() == 2 * expected


def test_flux_lite_macs_are_30_tera():
    """FLUX-Lite: 8 double + 38 single blocks, each 12C²N + 2N²C, = 30.0 T at 1024² with 512 text tokens."""
    size = dict(image_tokens=4096, text_tokens=512, width=3072, head_dim=128, heads=24)
    tokens, width = 4096 + 512, 3072
    per_block = 12 * width**2 * tokens + 2 * tokens**2 * width
    double, single = flux_double_block_macs(**size), flux_single_block_macs(**size)
    assert double == single == per_block
    total = 8 * double + 38 * single
    assert total == 46 * per_block
    assert round(total / 1e12, 1) == 30.0


# --------------------------------------------------------------------------- FlopCounterMode, static


def _counted_macs(block: nn.Module, excluded: tuple[str, ...] = (), **inputs) -> float:
    """MACs torch counts in `block(**inputs)`, minus the submodules flops.py does not count (FLOPs = 2·MACs).

    On CPU torch has no FLOP formula for the fused SDPA kernel (it counts 0), so the math backend is
    forced: it runs QKᵀ and A·V as bmm, which the counter does count.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        block(**inputs)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(block).__name__
    for name in excluded:
        assert f"{root}.{name}" in counts, f"{name} not found; diffusers block layout changed"
    return (counts[root] - sum(counts[f"{root}.{name}"] for name in excluded)) / 2


@pytest.mark.parametrize(
    ("stack", "excluded", "formula"),
    [
        ("transformer_blocks", ("norm1", "norm1_context"), flux_double_block_macs),  # adaLN modulation linears
        ("single_transformer_blocks", ("norm",), flux_single_block_macs),
    ],
)
def test_flux_block_macs_match_flop_counter(stack, excluded, formula):
    block = getattr(tiny_transformer("flux"), stack)[0]
    batch, n_img, n_txt = 2, 12, 5
    counted = _counted_macs(
        block, excluded=excluded,
        hidden_states=torch.randn(batch, n_img, 64), encoder_hidden_states=torch.randn(batch, n_txt, 64),
        temb=torch.randn(batch, 64),
    )
    expected = formula(image_tokens=n_img, text_tokens=n_txt, width=64, head_dim=16, heads=4)
    assert counted == batch * expected


def test_pixart_block_macs_match_flop_counter():
    """ada_norm_single blocks hold no modulation linear (it is global), so nothing is excluded."""
    block = tiny_transformer("pixart").transformer_blocks[0]
    batch, tokens, context = 2, 16, 7
    counted = _counted_macs(
        block, hidden_states=torch.randn(batch, tokens, 32),
        encoder_hidden_states=torch.randn(batch, context, 32), timestep=torch.randn(batch, 6 * 32),
    )
    expected = pixart_block_macs(tokens=tokens, context_tokens=context, width=32, head_dim=8, heads=4)
    assert counted == batch * expected


def test_cross_attention_block_with_narrow_heads_matches_flop_counter():
    """width ≠ heads·head_dim, context width ≠ width and D = 3C: catches swapped arguments."""
    from diffusers.models.attention import BasicTransformerBlock

    block = BasicTransformerBlock(
        24, 2, 8, cross_attention_dim=20, activation_fn="gelu-approximate", ff_inner_dim=72,
        attention_bias=True,
    )
    batch, tokens, context = 3, 11, 6
    counted = _counted_macs(
        block, hidden_states=torch.randn(batch, tokens, 24),
        encoder_hidden_states=torch.randn(batch, context, 20),
    )
    expected = pixart_block_macs(
        tokens=tokens, context_tokens=context, width=24, head_dim=8, heads=2, mlp_ratio=3,
        context_width=20,
    )
    assert counted == batch * expected


def test_latte_block_macs_match_flop_counter():
    """Spatial blocks see [B·F, S, C] with T2V cross-attention, temporal blocks [B·S, F, C]."""
    model = tiny_transformer("latte")
    batch, frames, per_frame, context = 2, 4, 9, 5
    size = dict(frames=frames, tokens_per_frame=per_frame, width=32, head_dim=8, heads=4)
    spatial = _counted_macs(
        model.transformer_blocks[0], hidden_states=torch.randn(batch * frames, per_frame, 32),
        encoder_hidden_states=torch.randn(batch * frames, context, 32),
        timestep=torch.randn(batch * frames, 6 * 32),
    )
    temporal = _counted_macs(
        model.temporal_transformer_blocks[0], hidden_states=torch.randn(batch * per_frame, frames, 32),
        timestep=torch.randn(batch * per_frame, 6 * 32),
    )
    assert spatial == batch * latte_spatial_block_macs(**size, context_tokens=context)
    assert temporal == batch * latte_temporal_block_macs(**size)


# --------------------------------------------------------------------------- FlopCounterMode, sliced


def _sliced_qkv(x: Tensor, weights: list[Tensor], heads: list[int], head_dim: int) -> list[Tensor]:
    """Q, K, V of the active heads only: the rows h·C_H … (h+1)·C_H − 1 of each weight."""
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    batch, tokens = x.shape[:2]
    return [F.linear(x, w[rows]).view(batch, tokens, len(heads), head_dim).transpose(1, 2) for w in weights]



def test_sliced_dit_block_matches_dynamic_formula():
    """Active heads, active MLP groups and per-sample SDT token counts, executed sliced."""
    width, heads, groups, hidden = 48, 4, 4, 192
    head_dim, group_width = width // heads, hidden // groups
    w_q, w_k, w_v, w_o = (torch.randn(width, width) for _ in range(4))
    fc1, fc2 = torch.randn(hidden, width), torch.randn(width, hidden)
    active_heads, active_groups, keep = [0, 2, 3], [0, 3], torch.tensor([3, 10, 0])
    x = torch.randn(3, 10, width)
    cols = torch.cat([torch.arange(g * group_width, (g + 1) * group_width) for g in active_groups])
    head_cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in active_heads])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        q, k, v = _sliced_qkv(x, [w_q, w_k, w_v], active_heads, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + F.linear(attn, w_o[:, head_cols])
        rows = torch.cat([x[b, : int(n)] for b, n in enumerate(keep)])  # SDT gather, flattened B·ñ
        F.linear(F.gelu(F.linear(rows, fc1[cols])), fc2[:, cols])
    active = dict(heads=torch.tensor(3.0), mlp=torch.tensor(len(active_groups) / groups), tokens=keep.float())
    expected = block_macs("pixart", heads=heads, head_dim=head_dim, hidden=hidden, image_tokens=10, active=active)
    assert counter.get_total_flops() / 2 == pytest.approx(expected.sum().item(), rel=1e-6)


def test_sliced_flux_single_block_matches_dynamic_formula():
    """Skipped image tokens pay Q/K/V and the core but neither proj_mlp nor proj_out."""
    width, heads, head_dim, hidden, groups = 64, 4, 16, 256, 4
    n_txt, n_img, keep = 5, 12, torch.tensor([7, 12])
    w_q, w_k, w_v = (torch.randn(width, width) for _ in range(3))
    proj_mlp, proj_out = torch.randn(hidden, width), torch.randn(width, width + hidden)
    active_heads, active_groups = [1, 3], [0, 1, 3]
    x = torch.randn(2, n_txt + n_img, width)
    head_cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in active_heads])
    group_cols = torch.cat([torch.arange(g * 64, (g + 1) * 64) for g in active_groups])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        q, k, v = _sliced_qkv(x, [w_q, w_k, w_v], active_heads, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        routed = [torch.arange(n_txt + int(n)) for n in keep]  # text first, then kept image tokens
        h_rows = torch.cat([x[b, idx] for b, idx in enumerate(routed)])
        a_rows = torch.cat([attn[b, idx] for b, idx in enumerate(routed)])
        mlp = F.gelu(F.linear(h_rows, proj_mlp[group_cols]))
        F.linear(torch.cat([a_rows, mlp], -1), proj_out[:, torch.cat([head_cols, width + group_cols])])
    expected = flux_single_block_macs(
        image_tokens=n_img, text_tokens=n_txt, width=width, head_dim=head_dim, heads=heads,
        active_heads=len(active_heads), group_fraction=len(active_groups) / groups,
        active_image_tokens=keep.float(),
    )
    assert counter.get_total_flops() / 2 == pytest.approx(expected.sum().item(), rel=1e-6)


# --------------------------------------------------------------------------- dynamic scaling


def test_dit_dynamic_macs_scale_and_are_differentiable():
    """A_dyn = (ĥ/H)·A, M_dyn = (ĝ/G)·(ñ/N)·M, with autograd gradients A/H, M·ñ/N, M·ĝ/N."""
    attn, mlp = 1_509_949_440.0, 2_717_908_992.0  # DiT-XL/2
    h = torch.tensor([16.0, 4.0, 1.0], requires_grad=True)
    g = torch.tensor([1.0, 0.5, 0.25], requires_grad=True)
    n = torch.tensor([256.0, 128.0, 0.0], requires_grad=True)
    macs = block_macs("pixart", heads=16, head_dim=72, hidden=4608, image_tokens=256,
                      active=dict(heads=h, mlp=g, tokens=n))
    assert macs.dtype == torch.float32 and macs.shape == (3,)
    torch.testing.assert_close(macs, attn * h.detach() / 16 + mlp * g.detach() * n.detach() / 256)
    macs.sum().backward()
    torch.testing.assert_close(h.grad, torch.full((3,), attn / 16))
    torch.testing.assert_close(g.grad, mlp * n.detach() / 256)
    torch.testing.assert_close(n.grad, mlp * g.detach() / 256)


def test_flux_dynamic_macs_scale():
    """Double: heads scale the joint attention; image/text group fractions and ñ_i scale their FFNs.
    Single: ∂/∂ñ_i = C·D·ĝ/G + C·(ĥC_H + D·ĝ/G), i.e. 9C² at full width."""
    c, n_i, n_t = 3072, 4096, 512
    size = dict(image_tokens=n_i, text_tokens=n_t, width=c, head_dim=128, heads=24)
    attn = self_attention_macs(tokens=n_i + n_t, width=c, head_dim=128, heads=24)
    double = flux_double_block_macs(
        **size, active_heads=6, image_group_fraction=0.5, text_group_fraction=0.25, active_image_tokens=1000
    )
    assert double == attn / 4 + 8 * c * c * (0.5 * 1000 + 0.25 * n_t)
    keep = torch.tensor([0.0, 4096.0], requires_grad=True)
    single = flux_single_block_macs(**size, active_image_tokens=keep)
    full = flux_single_block_macs(**size)
    torch.testing.assert_close(single, torch.tensor([full - 9 * c * c * n_i, full], dtype=torch.float32))
    single.sum().backward()
    torch.testing.assert_close(keep.grad, torch.full((2,), 9.0 * c * c))
    heads = torch.tensor([12.0], requires_grad=True)
    half = flux_single_block_macs(**size, active_heads=heads, group_fraction=0.5, active_image_tokens=2048)
    (grad,) = torch.autograd.grad(half.sum(), heads)
    # per head: Q/K/V + core on all N tokens, proj_out columns on the N_t + ñ_i routed tokens
    n = n_i + n_t
    assert grad.item() == pytest.approx(128 * (3 * c * n + 2 * n * n + c * (n_t + 2048)), rel=1e-6)


def test_cross_heads_scale_only_cross_attention():
    size = dict(tokens=256, context_tokens=120, width=1152, head_dim=72, heads=16)
    cross = cross_attention_macs(**size)
    assert cross == 2 * 256 * 1152**2 + 2 * 120 * 1152**2 + 2 * 256 * 120 * 1152  # C_ctx = C
    static = pixart_block_macs(**size)
    assert pixart_block_macs(**size, cross_heads=16) == static
    assert pixart_block_macs(**size, cross_heads=4) == static - cross * 3 / 4
    assert pixart_block_macs(**size, active_heads=4) == static - 3 / 4 * self_attention_macs(
        tokens=256, width=1152, head_dim=72, heads=16
    )


def test_latte_dynamic_macs_count_tokens_over_the_clip():
    size = dict(frames=16, tokens_per_frame=256, width=1152, head_dim=72, heads=16)
    mlp_full = 8 * 1152**2 * 16 * 256
    for fn in (latte_spatial_block_macs, latte_temporal_block_macs):
        assert fn(**size) - fn(**size, active_tokens=1024, group_fraction=0.5) == mlp_full * (1 - 0.5 / 4)
    spatial_attn = latte_spatial_block_macs(**size) - mlp_full
    temporal_attn = latte_temporal_block_macs(**size) - mlp_full
    assert spatial_attn == 16 * 1152 * (4 * 1152 * 256 + 2 * 256**2)
    assert temporal_attn == 256 * 1152 * (4 * 1152 * 16 + 2 * 16**2)
    assert latte_spatial_block_macs(**size, cross_heads=2) == latte_spatial_block_macs(**size)  # no context


def test_block_macs_dispatches_each_kind_to_its_formula():
    """The one dispatch: layer-table shape + token shape + active counts by role → the kind's formula."""
    shape = dict(width=64, head_dim=16, heads=4, mlp_ratio=3)
    h, cross, g, t, n = (torch.tensor([v]) for v in (2.0, 3.0, 0.5, 0.25, 7.0))
    context = dict(context_tokens=5, context_width=20, cross_heads=cross)
    expected = {
        "flux_double": flux_double_block_macs(image_tokens=12, text_tokens=5, **shape, active_heads=h,
                                              image_group_fraction=g, text_group_fraction=t, active_image_tokens=n),
        "flux_single": flux_single_block_macs(image_tokens=12, text_tokens=5, **shape, active_heads=h,
                                              group_fraction=g, active_image_tokens=n),
        "pixart": pixart_block_macs(tokens=12, **context, **shape, active_heads=h, group_fraction=g, active_tokens=n),
        "dit": pixart_block_macs(tokens=12, context_tokens=0, **shape, active_heads=h, group_fraction=g,
                                 active_tokens=n),
        "latte_spatial": latte_spatial_block_macs(frames=3, tokens_per_frame=12, **context, **shape, active_heads=h,
                                                  group_fraction=g, active_tokens=n),
        "latte_temporal": latte_temporal_block_macs(frames=3, tokens_per_frame=12, **shape, active_heads=h,
                                                    group_fraction=g, active_tokens=n),
    }
    layer = dict(heads=4, head_dim=16, hidden=192, cross_heads=4, context_width=20)
    active = dict(heads=h, cross_heads=cross, mlp=g, text_mlp=t, tokens=n)
    assert set(expected) == set(BLOCK_KINDS)
    for kind, macs in expected.items():  # a DiT block has no cross-attention, so no cross heads
        shaped = layer | dict(cross_heads=0) if kind == "dit" else layer
        got = block_macs(kind, **shaped, image_tokens=12, text_tokens=5, frames=3, active=active)
        torch.testing.assert_close(got, macs, rtol=0, atol=0)
    no_cross = block_macs("pixart", **(layer | dict(cross_heads=0)), image_tokens=12, text_tokens=5)
    assert no_cross == pixart_block_macs(tokens=12, context_tokens=0, **shape)
    assert no_cross == self_attention_macs(tokens=12, width=64, head_dim=16, heads=4) + 2 * 64 * 192 * 12
    with pytest.raises(ValueError, match="unknown block kind 'sit'"):
        block_macs("sit", heads=4, head_dim=16, hidden=192, image_tokens=12)


def test_mlp_ratio_given_as_hidden_over_width_recovers_hidden():
    """fl(1/49)·49 < 1: the hidden width must still come out as 1, not 0."""
    attn = self_attention_macs(tokens=3, width=49, head_dim=7, heads=7)
    assert block_macs("pixart", heads=7, head_dim=7, hidden=1, image_tokens=3) == attn + 2 * 49 * 1 * 3


def test_active_count_above_total_is_an_error():
    with pytest.raises(ValueError, match="must not exceed"):
        block_macs("pixart", heads=4, head_dim=8, hidden=128, image_tokens=16, active={"heads": 5})
    with pytest.raises(ValueError, match="must not exceed"):
        flux_single_block_macs(image_tokens=4, text_tokens=2, width=8, head_dim=2, heads=4, active_image_tokens=5)


# --------------------------------------------------------------------------- flops_ratio


class _ToyBlock(nn.Module):
    """Dynamic MACs = σ(logit_b)·full, recorded at forward time, like a masked block."""

    def __init__(self, full_macs: float, batch: int, child: nn.Module | None = None, dtype=torch.float32):
        super().__init__()
        self.full_macs, self.child, self._macs = full_macs, child, None
        self.logit = nn.Parameter(torch.randn(batch, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        self._macs = torch.sigmoid(self.logit) * self.full_macs
        return x if self.child is None else self.child(x)

    def last_macs(self) -> tuple[Tensor, float] | None:
        return None if self._macs is None else (self._macs, self.full_macs)


def test_flops_ratio_sums_dynamic_blocks_and_is_differentiable():
    inner = _ToyBlock(1e6, 3)  # inside `outer`: outer reports for it, it must not count twice
    first, outer = _ToyBlock(100.0, 3, dtype=torch.float64), _ToyBlock(300.0, 3, child=inner)
    model = nn.Sequential(first, nn.Linear(2, 2), nn.Sequential(outer))
    model(torch.randn(3, 2))
    ratio = flops_ratio(model)
    expected = (torch.sigmoid(first.logit.detach()).float() * 100 + torch.sigmoid(outer.logit.detach()) * 300) / 400
    assert ratio.dtype == torch.float32 and ratio.shape == (3,)
    torch.testing.assert_close(ratio, expected)
    ratio.sum().backward()
    sig = torch.sigmoid(outer.logit.detach())
    torch.testing.assert_close(outer.logit.grad, sig * (1 - sig) * 300 / 400)
    sig = torch.sigmoid(first.logit.detach())
    torch.testing.assert_close(first.logit.grad, sig * (1 - sig) * 100 / 400)
    assert inner.logit.grad is None


def test_flops_ratio_without_dynamic_blocks_or_forward_is_an_error():
    with pytest.raises(ValueError, match="no dynamic blocks"):
        flops_ratio(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match=r"block 0 \(_ToyBlock\).*run a forward"):
        flops_ratio(nn.Sequential(_ToyBlock(10.0, 2)))
