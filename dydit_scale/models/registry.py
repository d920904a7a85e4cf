"""The model families dydit_scale knows: one line per family, naming the module of its `FAMILY` record.

Modules load on first use, so naming the families costs no torch import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from dydit_scale.models.family import Family
    from dydit_scale.models.replica import Replica

__all__ = ["FAMILY_MODULES", "all_families", "all_replicas", "family_of", "get_family", "get_replica"]

#: family name -> the module that defines its `FAMILY`
FAMILY_MODULES: dict[str, str] = {
    "flux": "dydit_scale.models.flux",
    "pixart": "dydit_scale.models.pixart",
    "latte": "dydit_scale.models.latte",
    "dit": "dydit_scale.models.dit",
    "sit": "dydit_scale.models.sit",
}


def get_family(name: str) -> Family:
    """The record of family `name`."""
    module = FAMILY_MODULES.get(name)
    if module is None:
        raise ValueError(f"model.family: expected one of {', '.join(FAMILY_MODULES)}, got {name!r}")
    return importlib.import_module(module).FAMILY


def all_families() -> list[Family]:
    """Every registered family, in registry order."""
    return [get_family(name) for name in FAMILY_MODULES]


def family_of(model: nn.Module | str) -> Family | None:
    """The first family whose stock transformer class `model` is (or subclasses), or names; None if none.
    dit and sit share `DiTTransformer2DModel`; their dynamic models are the same, so the first serves."""
    for family in all_families():
        cls = family.transformer_class
        if model == cls.__name__ if isinstance(model, str) else isinstance(model, cls):
            return family
    return None


def all_replicas() -> dict[str, tuple[Family, Replica]]:
    """Every released pipeline the families replicate: name -> (family, replica)."""
    return {name: (family, replica) for family in all_families() for name, replica in family.replicas.items()}


def get_replica(name: str) -> tuple[Family, Replica]:
    """The family and replica called `name`."""
    replicas = all_replicas()
    if name not in replicas:
        raise ValueError(f"--replica: expected one of {', '.join(replicas)}, got {name!r}")
    return replicas[name]
