"""Plain (static) LoRA through peft, saved in diffusers' LoRA file format.

We do not hand-write plain LoRA: `peft.inject_adapter_in_model` works on all three families (FLUX
also has `add_adapter`, PixArt/Latte do not). Target matching is ours (the same suffix rule and
block scoping as TD-LoRA, an error for a target that matches nothing); peft then receives the
explicit list of full module names, which also makes the saved adapter metadata unambiguous.

File layout (`save_lora_diffusers`): `<folder>/pytorch_lora_weights.safetensors`, keys
`transformer.<module>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r] (peft names, no adapter
name), header {"format": "pt", "lora_adapter_metadata": JSON of the peft LoraConfig with keys prefixed
`transformer.`}. That is exactly what `FluxPipeline.save_lora_weights` writes, so
`FluxPipeline.load_lora_weights(folder)` loads it; the header carries `lora_alpha`, without which
diffusers would assume alpha = r.

A dynamic model's heads and MLP channels are permuted by magnitude; its A/B factors are written back
in the base model's order (and permuted again on load), so the stock model + the file computes the
fine-tuned model at full width.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

from dydit_scale.dynamic.importance import reorder_state_dict
from dydit_scale.io import read_safetensors
from dydit_scale.lora.td_lora import match_linears

__all__ = ["LORA_WEIGHT_NAME", "apply_lora", "load_lora_diffusers", "lora_state_dict", "save_lora_diffusers"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: diffusers' header key for the adapter config (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
_METADATA_KEY = "lora_adapter_metadata"
_PREFIX = "transformer"


def apply_lora(model: nn.Module, *, targets: Sequence[str], rank: int, alpha: float,
               block_prefixes: Sequence[str] | None = None) -> list[str]:
    """Inject a peft LoRA (adapter "default", B = 0 so outputs are unchanged) into every target Linear.

    Targets are module-name suffixes (optionally only inside `block_prefixes`); a target matching no
    `nn.Linear` raises ValueError. As with peft, afterwards only LoRA parameters require grad.
    Returns the adapted module names.
    """
    names = [name for name, _ in match_linears(model, targets, block_prefixes)]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, init_lora_weights=True)
    inject_adapter_in_model(config, model)
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's adapter state dict: `<module>.lora_A.weight` / `.lora_B.weight` (no adapter name)."""
    return get_peft_model_state_dict(model)


def _adapter_config(model: nn.Module) -> dict:
    configs = getattr(model, "peft_config", None)
    if not configs or "default" not in configs:
        raise ValueError("save_lora_diffusers: the model has no peft LoRA adapter (apply_lora first)")
    config = configs["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_lora_diffusers(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write `<folder>/pytorch_lora_weights.safetensors` in diffusers' format (see module docstring).

    The same layout for every family: FLUX loads it with `FluxPipeline.load_lora_weights`; PixArt and
    Latte have no diffusers LoRA loader, use `load_lora_diffusers` (peft's `set_peft_model_state_dict`).
    """
    from diffusers.loaders.lora_base import LoraBaseMixin

    metadata = {f"{_PREFIX}.{k}": v for k, v in _adapter_config(model).items()}
    base_order = reorder_state_dict(lora_state_dict(model), getattr(model, "dydit_spans", []), to_base=True)
    weights = {f"{_PREFIX}.{k}": v.detach().contiguous().cpu() for k, v in base_order.items()}
    folder = Path(folder)
    LoraBaseMixin.write_lora_layers(state_dict=weights, save_directory=str(folder), is_main_process=True,
                                    weight_name=LORA_WEIGHT_NAME, save_function=None,
                                    safe_serialization=True, lora_adapter_metadata=metadata)
    return folder / LORA_WEIGHT_NAME


def load_lora_diffusers(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Load a file written by `save_lora_diffusers` into a base model (PixArt/Latte path; works for FLUX).

    The adapter is injected from the header's config first when the model has none; a dynamic model
    gets the factors in its permuted order. Returns the adapted module names.
    """
    path = Path(folder) / LORA_WEIGHT_NAME
    tensors, metadata = read_safetensors(path)
    header = json.loads(metadata.get(_METADATA_KEY, "{}"))
    weights = {k.removeprefix(f"{_PREFIX}."): v for k, v in tensors.items()}
    weights = reorder_state_dict(weights, getattr(model, "dydit_spans", []), to_base=False)
    config = {k.removeprefix(f"{_PREFIX}."): v for k, v in header.items() if k.startswith(f"{_PREFIX}.")}
    if not config:
        raise ValueError(f"{path}: no {_METADATA_KEY} header; cannot tell rank and alpha")
    names = list(config["target_modules"])
    if getattr(model, "peft_config", None) is None:
        apply_lora(model, targets=names, rank=int(config["r"]), alpha=float(config["lora_alpha"]))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or missing:
        bad = (result.unexpected_keys or missing)[0]
        raise ValueError(f"{path}: adapter does not fit the model ({len(result.unexpected_keys)} unexpected, "
                         f"{len(missing)} missing LoRA keys, e.g. {bad})")
    return names
