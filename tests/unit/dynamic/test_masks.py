"""Mask primitives: unit (head / group) masks per block row, token masks, key padding from attention masks."""

from __future__ import annotations

import pytest
import torch

from dydit_scale.dynamic.masks import expand_rows, key_padding_mask, mask_tokens, mask_units


def test_unit_mask_zeroes_contiguous_channel_blocks_of_each_sample_row():
    hidden = torch.randn(4, 3, 12)  # 2 samples × 2 rows, 4 units of 3 channels
    mask = torch.tensor([[1.0, 0, 1, 0], [1.0, 1, 0, 0]])
    out = mask_units(hidden, mask)
    for row in range(4):
        for unit in range(4):
            block = out[row, :, 3 * unit:3 * unit + 3]
            expected = hidden[row, :, 3 * unit:3 * unit + 3] * mask[row // 2, unit]
            assert torch.equal(block, expected)
    assert mask_units(hidden, None) is hidden


def test_rows_repeat_per_sample_in_sample_major_order():
    assert torch.equal(expand_rows(torch.tensor([[1], [2]]), 6), torch.tensor([[1], [1], [1], [2], [2], [2]]))


def test_token_mask_zeroes_the_whole_update_of_a_skipped_token():
    update = torch.randn(2, 5, 4) + 1.0
    mask = torch.tensor([[1.0, 0, 1, 1, 0], [0.0, 0, 0, 0, 1]])
    out = mask_tokens(update, mask)
    assert (out[mask == 0] == 0).all() and torch.equal(out[mask == 1], update[mask == 1])


@pytest.mark.parametrize("kind", ["bool", "additive", "bool4d"])
def test_key_padding_follows_sdpa_mask_semantics(kind):
    keep = torch.tensor([[True, True, False, True, True], [True, False, False, True, True]])
    mask = {"bool": keep, "additive": (~keep).float() * -1e4, "bool4d": keep[:, None, None, :].expand(2, 1, 5, 5)}[kind]
    assert torch.equal(key_padding_mask(mask, slice(0, 3)), keep[:, :3])


def test_key_padding_of_an_unsupported_shape_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^attention_mask: expected shape .* got \[2, 5, 5\]$"):
        key_padding_mask(torch.ones(2, 5, 5, dtype=torch.bool), slice(0, 3))
