"""Parameter-efficient fine-tuning: TD-LoRA (timestep-gated experts) and plain LoRA via peft."""

from dydit_scale.lora.plain import apply_lora, load_lora_diffusers, lora_state_dict, save_lora_diffusers
from dydit_scale.lora.td_lora import (
    TDLoRAFileInfo,
    TDLoRALinear,
    TimestepGate,
    apply_td_lora,
    load_td_lora,
    load_td_lora_state_dict,
    read_td_lora_file,
    save_td_lora,
    td_lora_layers,
    td_lora_state_dict,
)

__all__ = [
    "TDLoRAFileInfo",
    "TDLoRALinear",
    "TimestepGate",
    "apply_lora",
    "apply_td_lora",
    "load_lora_diffusers",
    "load_td_lora",
    "load_td_lora_state_dict",
    "lora_state_dict",
    "read_td_lora_file",
    "save_lora_diffusers",
    "save_td_lora",
    "td_lora_layers",
    "td_lora_state_dict",
]
