"""The models `dydit-bench infer` times, built so that the three paths share one copy of the weights.

Presets: tiny and DiT-B widths show the overheads; one block per stack of a released pipeline at its
real width (from the family's replica record) shows the real costs. The released-width presets run
batch 1 and few steps by default, so that one preset takes minutes on two CPU cores.

Routers get random weights: the timestep routers zero bias, so about half of the heads and MLP groups
stay on, with scattered, t-dependent masks; the token routers a bias calibrated on the first step's
inputs so that they keep the preset's share of the tokens, data-dependently. Together that puts the
FLOPs ratio near 0.5.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dydit_scale.config import DynamicConfig
from dydit_scale.dynamic.routers import ConditionedTokenRouter, TimestepRouter, TokenRouter, full_width
from dydit_scale.infer.export import export_schedule
from dydit_scale.infer.fast import apply_schedule, weight_sharing_memo
from dydit_scale.models.build import set_attention_backend
from dydit_scale.models.convert import make_dynamic
from dydit_scale.models.registry import get_family, get_replica

__all__ = ["PRESETS", "Preset", "at_depth", "at_resolution", "build_paths", "cast", "model_inputs", "share_stock_weights",
           "step_inputs", "to_device"]


@dataclass(frozen=True)
class Preset:
    """One benchmarked transformer, its dynamic config, the token shape it runs at and its defaults."""

    family: str
    config: dict[str, Any]
    dynamic: dict[str, Any]
    text_tokens: int
    tokens: str
    """The token shape in words, for the table and the JSON."""
    help: str
    latent_hw: tuple[int, int] | None = None
    """Latent grid (before FLUX's 2×2 packing); None: the config's sample size."""
    resolution: tuple[int, int] = (1024, 1024)
    """Pixels the latents stand for: the scheduler's time keys follow them (FLUX's shift)."""
    token_keep: float = 0.75
    """Share of the tokens the token routers keep (SDT presets)."""
    defaults: dict[str, int] = field(default_factory=lambda: dict(steps=4, batch=2, repeats=5))
    resizable: bool = False
    """Whether `at_resolution` may change the pixels (the released-width presets)."""
    replica: str | None = None
    """The released model whose width this is (`at_depth` may then change the blocks per stack)."""


def _released(replica: str, dynamic: dict[str, Any], text_tokens: int, tokens: str, note: str,
              layers: int | None = 1, batch: int = 1, **kwargs: Any) -> Preset:
    """`layers` blocks per stack (None: the released depth) of `replica` at its released width, with SDT on."""
    family, record = get_replica(replica)
    return Preset(family.name, record.transformer_config(layers), dynamic | dict(tokens=True), text_tokens, tokens,
                  f"{record.source} width, {note}; {tokens}; batch {batch} by default",
                  defaults=dict(steps=2, batch=batch, repeats=3), resizable=True, replica=replica, **kwargs)


_DIT_B = dict(num_attention_heads=12, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=4,
              cross_attention_dim=768, sample_size=32, patch_size=2, caption_channels=64,
              use_additional_conditions=False, norm_type="ada_norm_single")

PRESETS: dict[str, Preset] = {
    "tiny": Preset("pixart", get_family("pixart").tiny_config, dict(cross_attention=True, tokens=False), 5,
                   "16 image + 5 text tokens", "tiny PixArt (C = 32, 4 heads, 16 tokens): overheads dominate"),
    "tiny-flux": Preset("flux", get_family("flux").tiny_config, dict(tokens=False), 5, "16 image + 5 text tokens",
                        "tiny FLUX (C = 64, 4 heads, 16 + 5 tokens)"),
    "dit-b": Preset("pixart", _DIT_B, dict(cross_attention=True, tokens=False), 16, "256 image + 16 text tokens",
                    "DiT-B width (C = 768, 12 heads, 256 tokens, 4 blocks), TDW only"),
    "dit-b-sdt": Preset("pixart", _DIT_B, dict(cross_attention=True, tokens=True), 16, "256 image + 16 text tokens",
                        "dit-b with token routers dropping part of the tokens (SDT gather/scatter)"),
    "flux-dev": _released("flux-dev", {}, 512,
                          "512² (not 1024², to keep CPU runs short): 1024 image + 512 text tokens",
                          "1 double + 1 single block", latent_hw=(64, 64), resolution=(512, 512), token_keep=0.6),
    "pixart-alpha": _released("pixart-alpha-1024", dict(cross_attention=True), 120,
                              "1024²: 4096 image + 120 text tokens", "1 block, dynamic cross-attention",
                              token_keep=0.85),
    "latte-1": _released("latte-1", dict(cross_attention=True), 120,
                         "256² × 16 frames: 16 × 256 image + 120 text tokens",
                         "1 spatial + 1 temporal block, dynamic cross-attention", latent_hw=(32, 32),
                         resolution=(256, 256), token_keep=0.85),
    "dit-xl": _released("dit-xl-2-256", {}, 0, "256²: 256 image tokens",
                        "all 28 blocks; batch 2 is one image under classifier-free guidance, as DiTPipeline runs it",
                        layers=None, batch=2, resolution=(256, 256), token_keep=0.85),
}


def at_resolution(name: str, resolution: int | None) -> Preset:
    """Preset `name` at `resolution`² pixels when given (released-width presets only): the latents,
    the scheduler's time keys (FLUX's resolution shift) and the token count follow. Each of these
    models has an 8× VAE and 2×2 patches (FLUX packs them), so a side must be a multiple of 16."""
    preset = PRESETS[name]
    if resolution is None:
        return preset
    if not preset.resizable:
        names = ", ".join(key for key, value in PRESETS.items() if value.resizable)
        raise ValueError(f"--resolution: only for the released-width presets ({names}), not {name}")
    if resolution < 16 or resolution % 16:
        raise ValueError(f"--resolution: expected a positive multiple of 16 pixels, got {resolution}")
    image, frames = (resolution // 16) ** 2, preset.config.get("video_length")
    text = f" + {preset.text_tokens} text" if preset.text_tokens else ""
    tokens = (f"{resolution}² × {frames} frames: {frames} × {image} image{text} tokens"
              if frames else f"{resolution}²: {image} image{text} tokens")
    return replace(preset, latent_hw=(resolution // 8, resolution // 8), resolution=(resolution, resolution),
                   tokens=tokens)


def at_depth(preset: Preset, layers: int | None) -> Preset:
    """`preset` with `layers` blocks per stack when given (released-width presets only)."""
    if layers is None:
        return preset
    if preset.replica is None:
        raise ValueError("--layers: only for the released-width presets")
    if layers < 1:
        raise ValueError(f"--layers: expected an integer >= 1, got {layers}")
    _, record = get_replica(preset.replica)
    return replace(preset, config=record.transformer_config(layers))


def _init_routers(model: nn.Module, seed: int) -> None:
    """Random TDW router weights with zero bias and random token-router output weights."""
    g = torch.Generator().manual_seed(seed)

    def randn(param: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.randn(param.shape, generator=g) * scale

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TimestepRouter):
                module.proj.weight.copy_(randn(module.proj.weight, 1.0))
                module.proj.bias.zero_()
            elif isinstance(module, TokenRouter):
                module.fc2.weight.copy_(randn(module.fc2.weight, 0.5))
            elif isinstance(module, ConditionedTokenRouter):
                module.score.weight.copy_(randn(module.score.weight, module.score.in_features ** -0.5))


@torch.no_grad()
def _calibrate_tokens(model: nn.Module, inputs: dict[str, Any], keep: float) -> None:
    """Give each token router the bias that keeps a `keep` share of the tokens of `inputs` in a
    full-width pass, whatever the scale of its random scores."""
    layers = [module.score if isinstance(module, ConditionedTokenRouter) else module.fc2
              for module in model.modules() if isinstance(module, (TokenRouter, ConditionedTokenRouter))]
    scores: dict[nn.Module, torch.Tensor] = {}

    def record(layer: nn.Module, args: Any, out: torch.Tensor) -> None:
        scores[layer] = (out - layer.bias.float()).flatten()

    hooks = [layer.register_forward_hook(record) for layer in layers]
    try:
        with full_width(model):
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    for layer in layers:
        layer.bias.fill_(-float(torch.quantile(scores[layer], 1 - keep)))


def share_stock_weights(stock: nn.Module, dynamic: nn.Module) -> None:
    """Point every parameter and buffer of `stock` at the dynamic model's tensor of the same name, or of
    its peft-wrapped `base_layer` (a LoRA run: the stock cost, as if merged)."""
    tensors = dict(dynamic.named_parameters()) | dict(dynamic.named_buffers())
    for name, _ in [*stock.named_parameters(), *stock.named_buffers()]:
        owner, _, attr = name.rpartition(".")
        wrapped = f"{owner}.base_layer.{attr}" if owner else f"base_layer.{attr}"
        tensor = tensors.get(name, tensors.get(wrapped))
        if tensor is None:
            raise ValueError(f"--run: the dynamic model has no tensor for the stock model's {name}")
        setattr(stock.get_submodule(owner), attr, tensor)


def cast(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`model` on `device` in `dtype` (`.bfloat16()` rather than diffusers' `.to(dtype)`, which warns about
    `from_pretrained` options a random-init model has no use for)."""
    model = model.to(device)
    return model.bfloat16() if dtype == torch.bfloat16 else model


def to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Floating tensors to `dtype` on `device`, nested dicts too."""
    if isinstance(value, dict):
        return {key: to_device(item, device, dtype) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype if value.is_floating_point() else None)
    return value


def model_inputs(family: str, config: Any, *, batch: int, text_tokens: int, latent_hw: tuple[int, int] | None,
                 seed: int) -> dict[str, Any]:
    """Random transformer inputs without the timestep (the family's `example_inputs`)."""
    return get_family(family).example_inputs(config, batch=batch, text_tokens=text_tokens,
                                             generator=torch.Generator().manual_seed(seed), latent_hw=latent_hw)


def step_inputs(preset: Preset, config: Any, keys: torch.Tensor, batch: int, seed: int, device: torch.device,
                dtype: torch.dtype) -> list[dict[str, Any]]:
    """One keyword-input dict per step: fixed latents and text, the step's key for every sample."""
    common = model_inputs(preset.family, config, batch=batch, text_tokens=preset.text_tokens,
                          latent_hw=preset.latent_hw, seed=seed)
    common = to_device(common, device, dtype)
    return [dict(common, timestep=key.reshape(1).expand(batch).to(device), return_dict=False) for key in keys]


def build_paths(preset: Preset, keys: torch.Tensor, batch: int, seed: int, device: torch.device,
                dtype: torch.dtype, attention: str) -> tuple[dict[str, nn.Module], list[dict[str, Any]]]:
    """The stock, masked and fast transformers over one set of weights, and the inputs of each step."""
    cls = get_family(preset.family).transformer_class
    torch.manual_seed(seed)
    dynamic = make_dynamic(cast(cls(**preset.config), device, dtype), DynamicConfig(**preset.dynamic)).eval()
    _init_routers(dynamic, seed)
    with torch.device("meta"):
        stock = cls(**preset.config).eval()
    share_stock_weights(stock, dynamic)
    if attention != "sdpa":  # the stock processors and the masked blocks run SDPA already
        for model in (stock, dynamic):
            set_attention_backend(model, attention)
    steps = step_inputs(preset, stock.config, keys, batch, seed, device, dtype)
    if preset.dynamic.get("tokens", True):
        _calibrate_tokens(dynamic, steps[0], preset.token_keep)
    fast = apply_schedule(copy.deepcopy(dynamic, weight_sharing_memo(dynamic)), export_schedule(dynamic, keys),
                          attention=attention, verify=False)
    return {"static": stock, "masked": dynamic, "fast": fast}, steps
