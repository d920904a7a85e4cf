"""WebDataset image-text / video-text / pre-encoded streaming with skip counts and exact resume.

Names load on first use (PEP 562), so `dydit-data validate` can import `format` without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "build_loader": "dydit_scale.data.loader",
    "ShardLoader": "dydit_scale.data.loader",
    "DataFormatError": "dydit_scale.data.format",
    "SKIP_REASONS": "dydit_scale.data.format",
    "ImageBatch": "dydit_scale.data.format",
    "VideoBatch": "dydit_scale.data.format",
    "LatentBatch": "dydit_scale.data.format",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dydit_scale.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
