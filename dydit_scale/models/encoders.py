"""Frozen VAE and text encoders from the user's local pipeline folder, used without gradients.

We reuse each diffusers pipeline's own `encode_prompt`, so captions are tokenised and embedded exactly
as at sampling time (FLUX: CLIP pooled + T5 sequence; PixArt/Latte: T5 sequence + mask).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dydit_scale.models.loading import load_pipeline


def load_frozen_components(path: str | Path, dtype: torch.dtype = torch.float32):
    """The pipeline without its transformer (VAE + text encoders + tokenizers), frozen and in eval mode."""
    pipe = load_pipeline(path, dtype=dtype, transformer=None, drop_transformer=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_text(family: str, pipe, captions: list[str], *, max_tokens: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Caption embeddings for the transformer: `prompt_embeds` (+ `pooled_prompt_embeds` for FLUX,
    `prompt_attention_mask` for PixArt)."""
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=device,
                                               max_sequence_length=max_tokens)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if family == "pixart":
        embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device,
                                                clean_caption=False, max_sequence_length=max_tokens)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}
    embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device,
                                   clean_caption=False, mask_feature=False)
    return {"prompt_embeds": embeds}
