"""`apply_schedule`: the fast dynamic inference path (sliced weights, kept tokens only).

The dynamic model is changed in place, as `make_dynamic` does: its class becomes a `Fast…` subclass
whose forward is the stock diffusers forward (pipelines run it unchanged) over blocks switched to
their sliced versions (`fast_blocks`). A forward pre-hook looks up the step by the exact timestep the
pipeline passes, gives the TDW routers the schedule's masks instead of running them and sets this
step's TD-LoRA π and token-router state: as a hook it runs before any wrapper that replaces the
forward or swaps the block list (cache-dit's step cache does both). Every sample of a batch — both
CFG halves — shares the step's masks; the token routers stay live.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dydit_scale.dynamic.routers import TimestepRouter
from dydit_scale.dynamic.schedule import RouterSchedule
from dydit_scale.infer.export import model_hashes, timestep_routers
from dydit_scale.infer.fast_blocks import FAST_BLOCKS, FastState
from dydit_scale.infer.runs import stock_class
from dydit_scale.infer.sliced import Attention, check_attention
from dydit_scale.models.dynamic_model import DynamicTransformerMixin, stock_signature

__all__ = ["FastTransformerMixin", "apply_schedule", "weight_sharing_memo"]


class FastTransformerMixin:
    """Forward of a model made fast by `apply_schedule`: the stock forward (the pre-hook `_begin_step`
    has set the step's masks), not the dynamic model's router pass."""

    dydit_schedule: RouterSchedule
    dydit_fast: FastState

    def forward(self, *args, **kwargs):
        return super(DynamicTransformerMixin, self).forward(*args, **kwargs)

    @torch.no_grad()
    def _begin_step(self, timestep: torch.Tensor, batch: int) -> None:
        """Masks of this step into the routers' `decision`; π, token-router and block state from e_t."""
        step = self.dydit_schedule.step_index(timestep)
        e_t = self.timestep_embedding(timestep, batch)
        for module in self._fast_prepared:
            module.prepare_step(e_t)
        for name, router in self._fast_routers.items():
            mask = self.dydit_schedule.masks[name][step]
            router.decision = mask.to(e_t.device, torch.float32)[None].expand(batch, -1)
        for block in self._fast_blocks:
            block.use_step(step)
        if self.dydit_fast.token_log is not None:
            self.dydit_fast.token_log.append(None)


def _step_pre_hook(model: FastTransformerMixin, args: tuple, kwargs: dict) -> None:
    bound = stock_signature(type(model)).bind(model, *args, **kwargs)
    model._begin_step(bound.arguments["timestep"], bound.arguments["hidden_states"].shape[0])


@functools.cache
def _fast_class(cls: type) -> type:
    return type(f"Fast{cls.__name__}", (FastTransformerMixin, cls), {"__module__": __name__})


def _check_model_class(model: nn.Module, schedule: RouterSchedule) -> None:
    stock = stock_class(model).__name__
    if stock != schedule.model_class:
        raise ValueError(f"apply_schedule: the schedule was exported for a {schedule.model_class} "
                         f"({schedule.family or '?'}), the model is a {stock}; export it from this model")


def _check_routers(model: nn.Module, schedule: RouterSchedule) -> dict[str, TimestepRouter]:
    routers = timestep_routers(model)
    missing, extra = sorted(routers.keys() - schedule.masks.keys()), sorted(schedule.masks.keys() - routers.keys())
    if missing or extra:
        raise ValueError(f"apply_schedule: the schedule's routers do not match the model's (not in the schedule: "
                         f"{missing[:3]}, not in the model: {extra[:3]}); export it from this model")
    for name, router in routers.items():
        if schedule.masks[name].shape[1] != router.units:
            raise ValueError(f"apply_schedule: {name} has {router.units} units, the schedule "
                             f"{schedule.masks[name].shape[1]}")
    return routers


def _check_hashes(model: nn.Module, schedule: RouterSchedule) -> None:
    base, checkpoint = model_hashes(model)
    if base != schedule.base_model_hash:
        raise ValueError(f"apply_schedule: the model's base weights ({base[:19]}…) differ from those the schedule "
                         f"was exported from ({schedule.base_model_hash[:19]}…); re-export the schedule")
    if checkpoint != schedule.checkpoint_hash:
        raise ValueError(f"apply_schedule: the model's routers/adapters ({checkpoint[:19]}…) differ from the "
                         f"schedule's checkpoint ({schedule.checkpoint_hash[:19]}…); re-export the schedule")


def weight_sharing_memo(model: nn.Module) -> dict[int, object]:
    """A `copy.deepcopy` memo under which a copy of `model` shares its parameters and buffers and, for a
    fast model, its blocks' sliced-weight caches (one more model that runs the schedule costs no memory)."""
    memo: dict[int, object] = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    for block in getattr(model, "_fast_blocks", ()):
        memo |= {id(block._cache): block._cache, id(block._cache_bytes): block._cache_bytes}
    return memo


def apply_schedule(model: nn.Module, schedule: RouterSchedule, *, low_memory: bool = False,
                   attention: Attention = "sdpa", verify: bool = True) -> nn.Module:
    """Make a dynamic transformer execute `schedule` with sliced weights; in place, returns it in eval mode.

    low_memory: slice the weights in every forward instead of caching them per unique mask (memory for time).
    attention: sdpa (`F.scaled_dot_product_attention`) | xformers (CUDA + xformers installed).
    verify: check the base-weight and checkpoint hashes against the schedule's.
    """
    if not isinstance(model, DynamicTransformerMixin):
        raise TypeError(f"apply_schedule: expected a dynamic transformer (make_dynamic), got {type(model).__name__}")
    if isinstance(model, FastTransformerMixin):
        raise ValueError("apply_schedule: the model already executes a schedule")
    check_attention(attention)
    _check_model_class(model, schedule)
    routers = _check_routers(model, schedule)
    if verify:
        _check_hashes(model, schedule)
    state = FastState(schedule, low_memory=low_memory, attention=attention)
    blocks = []
    for name, module in model.named_modules():
        fast = FAST_BLOCKS.get(type(module))
        if fast is not None:
            module.__class__ = fast
            module.setup_fast(name, state)
            blocks.append(module)
    prepared = [m for m in model.modules() if m is not model and not isinstance(m, TimestepRouter)
                and callable(getattr(m, "prepare_step", None))]
    model.__class__ = _fast_class(type(model))
    for key, value in (("dydit_schedule", schedule), ("dydit_fast", state), ("_fast_routers", routers),
                       ("_fast_blocks", blocks), ("_fast_prepared", prepared)):
        object.__setattr__(model, key, value)
    model.register_forward_pre_hook(_step_pre_hook, with_kwargs=True)
    return model.eval()
