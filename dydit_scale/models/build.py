"""Build the trainable dynamic transformer of a recipe: load → make dynamic → adapters → trainable set.

Used by training, export and sampling alike, so a checkpoint always meets the module tree it was
saved from.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from dydit_scale.config import DynamicConfig, LoraConfig, ModelConfig
from dydit_scale.dynamic.routers import router_parameters
from dydit_scale.lora import apply_lora, apply_td_lora
from dydit_scale.models.convert import make_dynamic
from dydit_scale.models.loading import load_transformer


def dynamic_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the dynamic blocks (modules that account their own MACs)."""
    return [name for name, module in model.named_modules() if name and hasattr(module, "last_macs")]


def attention_problem(kind: str) -> str | None:
    """Why `model.attention: kind` cannot run on this machine (None if it can); shared with start-up checks."""
    if kind == "xformers" and (not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None):
        return "model.attention: xformers needs CUDA and the xformers package (pip install '.[gpu]'); use sdpa here"
    return None


def set_attention_backend(model: nn.Module, kind: str) -> None:
    """`model.attention`: sdpa (torch SDPA, everywhere) | xformers (CUDA + the [gpu] extra only).

    Never a silent fallback: asking for xformers where it cannot run is an error.
    """
    if kind == "xformers":
        problem = attention_problem(kind)
        if problem is not None:
            raise ValueError(problem)
        model.set_attention_backend("xformers")
    else:
        model.set_attention_backend("native")


def build_dynamic_transformer(model_cfg: ModelConfig, dynamic_cfg: DynamicConfig, lora_cfg: LoraConfig,
                              dtype: torch.dtype = torch.float32) -> nn.Module:
    """The recipe's dynamic transformer in `dtype`, with adapters applied and the trainable set chosen:
    everything for full fine-tuning; adapters + every router (+ TD-LoRA gates) otherwise."""
    model = make_dynamic(load_transformer(model_cfg.path, model_cfg.family, dtype=dtype), dynamic_cfg)
    set_attention_backend(model, model_cfg.attention)
    return apply_adapters(model, lora_cfg)


def apply_adapters(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """Adapters and the trainable set of a dynamic model: everything for full fine-tuning; adapters +
    every router (+ TD-LoRA gates) otherwise."""
    blocks = dynamic_blocks(model)
    if lora_cfg.kind == "td_lora":
        apply_td_lora(model, targets=lora_cfg.targets, rank=lora_cfg.rank, alpha=lora_cfg.alpha,
                      experts=lora_cfg.groups, cond_dim=timestep_embedding_dim(model), block_prefixes=blocks)
    elif lora_cfg.kind == "lora":
        apply_lora(model, targets=lora_cfg.targets, rank=lora_cfg.rank, alpha=lora_cfg.alpha, block_prefixes=blocks)
    else:
        model.requires_grad_(True)
    for param in router_parameters(model).values():
        param.requires_grad_(True)
    return model


def timestep_embedding_dim(model: nn.Module) -> int:
    """Width C of the pure timestep embedding e_t (the transformer's inner width)."""
    config = model.config
    return config.num_attention_heads * config.attention_head_dim
