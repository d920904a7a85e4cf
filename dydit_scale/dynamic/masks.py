"""Dense (masked) execution of TDW and SDT for training.

Shapes never change: a removed head, channel group or token is multiplied by 0, which equals the
sliced computation of the fast path up to reduction order, keeps ZeRO-3 partitioning and
activation checkpointing happy, and lets the straight-through gradient reach the routers.
"""

from __future__ import annotations

import torch

__all__ = ["expand_rows", "key_padding_mask", "mask_tokens", "mask_units"]


def expand_rows(per_sample: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat per-sample masks [B, ...] to the block's `rows` (Latte: B·F or B·S, sample-major)."""
    batch = per_sample.shape[0]
    assert rows % batch == 0, (rows, batch)
    return per_sample if rows == batch else per_sample.repeat_interleave(rows // batch, dim=0)


def mask_units(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the inactive units of hidden [R, N, U·S] for a unit mask [B, U] (heads or MLP groups).

    Units are contiguous blocks of S channels (head h owns channels h·C_H … (h+1)·C_H − 1; group g
    the D_H channels after the magnitude permutation).
    """
    if mask is None:
        return hidden
    mask = expand_rows(mask, hidden.shape[0])
    size = hidden.shape[-1] // mask.shape[-1]
    assert size * mask.shape[-1] == hidden.shape[-1], (hidden.shape, mask.shape)
    return hidden * mask.repeat_interleave(size, dim=-1)[:, None, :].to(hidden.dtype)


def mask_tokens(update: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a token mask [R, N] to a residual update [R, N, C], fc2 bias included: a skipped token
    gets no update at all, as when the sliced path never runs its MLP."""
    return update if mask is None else update * mask[..., None].to(update.dtype)


def key_padding_mask(attention_mask: torch.Tensor, keys: slice) -> torch.Tensor:
    """Which keys in `keys` are real tokens, [B, len], from an SDPA-style attention mask.

    Accepts [B, K] or [B, 1|H, Q, K]; bool = True attends, float = additive bias (0 attends).
    """
    if attention_mask.dim() == 4:
        attention_mask = attention_mask[:, 0, -1, :]
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask: expected shape [B, K] or [B, 1, Q, K], got {list(attention_mask.shape)}"
        )
    selected = attention_mask[:, keys]
    return selected if selected.dtype == torch.bool else selected == 0
