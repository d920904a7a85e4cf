"""Frozen VAE and text encoders from the user's local pipeline folder, used without gradients.

Captions are embedded by each family's `encode_text`, which calls the pipeline's own
`encode_prompt`, so they are tokenised and embedded exactly as at sampling time.
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
