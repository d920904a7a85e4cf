"""`make_dynamic`: turn a diffusers FLUX, PixArt-α or Latte transformer into a DyDiT model.

Steps (method spec §2.6, architecture rule 3): check the model and the `dynamic:` config, rank
and permute heads and MLP channels by magnitude (function-preserving), replace each block by a
dynamic block that owns the original submodules (same state-dict keys; new parameters all have
`router` in their names), and switch the instance to a thin subclass whose forward computes the
pure timestep embedding and then runs the stock diffusers forward — pipelines keep working.
"""

from __future__ import annotations

from collections.abc import Callable

from diffusers import FluxTransformer2DModel, LatteTransformer3DModel, PixArtTransformer2DModel
from torch import nn

from dydit_scale.config import DynamicConfig
from dydit_scale.models.flux import convert_flux
from dydit_scale.models.latte import convert_latte
from dydit_scale.models.pixart import convert_pixart

__all__ = ["make_dynamic"]

_CONVERTERS: dict[type, Callable[[nn.Module, DynamicConfig], nn.Module]] = {
    FluxTransformer2DModel: convert_flux,
    PixArtTransformer2DModel: convert_pixart,
    LatteTransformer3DModel: convert_latte,
}


def make_dynamic(transformer: nn.Module, config: DynamicConfig | None = None) -> nn.Module:
    """Make `transformer` dynamic in place and return it (TDW + SDT, spec §2-§4, §9-§11).

    A fresh result computes the same function as the stock model in train and eval mode (router
    biases start every head, group and token on). Permute before creating optimizer state or LoRA
    adapters (P20); the permutations are in `model.dydit_permutations`.
    """
    convert = _CONVERTERS.get(type(transformer))
    if convert is None:
        supported = ", ".join(cls.__name__ for cls in _CONVERTERS)
        raise TypeError(f"make_dynamic: expected a diffusers {supported}, got {type(transformer).__name__}")
    training = transformer.training
    model = convert(transformer, config or DynamicConfig())
    return model.train(training)  # new routers follow the model's train/eval mode
