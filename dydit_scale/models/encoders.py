"""Frozen VAE and text encoders from the user's local pipeline folder, used without gradients.

Captions are embedded by each family's `encode_text`, which calls the pipeline's own
`encode_prompt`, so they are tokenised and embedded exactly as at sampling time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dydit_scale.models.loading import load_pipeline


def load_frozen_components(path: str | Path, *, text_dtype: torch.dtype = torch.float32,
                           device: torch.device | str = "cpu"):
    """The pipeline without its transformer (VAE + text encoders + tokenizers), frozen and in eval mode,
    on `device`.

    The text encoders take the transformer's dtype, as diffusers' training scripts do: T5-XXL alone
    is 19 GB in fp32 on every rank. The VAE stays fp32 (small, and its latents are the targets).
    """
    pipe = load_pipeline(path, dtype={"vae": torch.float32, "default": text_dtype}, transformer=None,
                         drop_transformer=True)
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
