"""dydit_scale: turn diffusers transformers into dynamic (DyDiT) ones and fine-tune them at scale.

Importing the package is cheap; the public names below load their modules on first use (PEP 562),
so `dydit-validate` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DynamicConfig": "dydit_scale.config",
    "load_recipe": "dydit_scale.config",
    "make_dynamic": "dydit_scale.models.convert",
    "full_width": "dydit_scale.dynamic.routers",
    "flops_ratio": "dydit_scale.dynamic.flops",
    "RouterSchedule": "dydit_scale.dynamic.schedule",
    "export_schedule": "dydit_scale.infer.export",
    "apply_schedule": "dydit_scale.infer.fast",
    "load_run": "dydit_scale.infer.runs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dydit_scale' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
