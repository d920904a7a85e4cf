"""Magnitude ranking and permutation of heads and MLP channels on plain torch layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dydit_scale.dynamic.importance import UnitSlice, apply_permutation, rank_units, unit_scores

HEADS, HEAD_DIM, WIDTH = 4, 3, 12


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x):
        q, k, v = (p(x).unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def parts(self):
        return [UnitSlice(p, True, HEAD_DIM) for p in (self.q, self.k, self.v)] + [UnitSlice(self.o, False, HEAD_DIM)]


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_head_permutation_preserves_output_and_sorts_scores(norm):
    torch.manual_seed(0)
    attn, x = _Attention(), torch.randn(2, 5, WIDTH)
    with torch.no_grad():  # make head 3 clearly the biggest
        attn.v.weight[3 * HEAD_DIM:] *= 10
    expected = attn(x)
    perm = rank_units(attn.parts(), HEADS, norm)
    assert perm[0] == 3 and not torch.equal(perm, torch.arange(HEADS))
    apply_permutation(attn.parts(), perm)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=0)
    scores = unit_scores(attn.parts(), HEADS, norm)
    assert (scores[:-1] >= scores[1:]).all()


def test_l1_score_sums_absolute_weights_of_rows_and_columns():
    fc1, fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
    parts = [UnitSlice(fc1, True, 1), UnitSlice(fc2, False, 1)]
    expected = fc1.weight.abs().sum(1) + fc2.weight.abs().sum(0)
    torch.testing.assert_close(unit_scores(parts, 4, "l1").float(), expected.detach())


def test_fused_projection_columns_move_with_offset_units():
    """A FLUX-single-like fused proj_out(concat[a (4), mlp (6)]): permuting the MLP part keeps the function."""
    torch.manual_seed(1)
    proj_mlp, proj_out, x, a = nn.Linear(5, 6), nn.Linear(10, 5), torch.randn(3, 5), torch.randn(3, 4)

    def run():
        return proj_out(torch.cat([a, F.gelu(proj_mlp(x))], -1))

    expected = run()
    parts = [UnitSlice(proj_mlp, True, 1), UnitSlice(proj_out, False, 1, start=4)]
    before, bias = proj_out.weight[:, :4].clone(), proj_mlp.bias.clone()
    perm = rank_units(parts, 6)
    apply_permutation(parts, perm)
    torch.testing.assert_close(run(), expected, atol=1e-6, rtol=0)
    assert torch.equal(proj_out.weight[:, :4], before)  # the attention columns stay put
    assert torch.equal(proj_mlp.bias, bias[perm])  # producers' biases move with their rows
