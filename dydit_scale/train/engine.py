"""DeepSpeed engine construction: parameter groups, LR schedule, and a ZeRO-3-correct EMA.

DeepSpeed is driven directly (`deepspeed.initialize`): accelerate mis-detects ranks on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from dydit_scale import dist
from dydit_scale.config import Recipe
from dydit_scale.dynamic.routers import router_parameters
from dydit_scale.train.ds_config import build_ds_config

#: `optim.schedule` -> the diffusers scheduler (`diffusers.optimization.SchedulerType`) that runs it.
#: Every one ramps linearly over `optim.warmup_steps` first (diffusers' "constant" would skip the
#: warm-up, so constant maps to "constant_with_warmup"). The recipe schema accepts only these names.
LR_SCHEDULES: dict[str, str] = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def parameter_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: routers (lr × dynamic.router_lr_scale) and the rest.

    Routers are found by module type (`router_parameters`), so an adapter or user layer whose name
    contains "router" stays in the weights group.
    """
    router_ids = {id(param) for param in router_parameters(model).values()}
    routers, others = [], []
    for param in model.parameters():
        if param.requires_grad:
            (routers if id(param) in router_ids else others).append(param)
    lr = recipe.optim.lr
    groups = [{"params": others, "lr": lr, "name": "weights"},
              {"params": routers, "lr": lr * recipe.dynamic.router_lr_scale, "name": "routers"}]
    return [g for g in groups if g["params"]]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' `get_scheduler` for `optim.schedule` over `train.steps` optimizer steps, after a linear
    warm-up of `optim.warmup_steps` (from 0 at the first step, diffusers' convention); each group's
    LR is scaled from its own base LR."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(LR_SCHEDULES[recipe.optim.schedule], optimizer,
                         num_warmup_steps=recipe.optim.warmup_steps, num_training_steps=recipe.train.steps)


def jit_build_note(builder_name: str) -> str | None:
    """A line announcing that DeepSpeed will JIT-compile the op of `builder_name` (e.g.
    "ShareMemCommBuilder"), or None when it is pre-built, not used here, or its library already lies in
    the torch extensions folder. The first launch otherwise sits silent for tens of seconds."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or installed_ops.get(builder.NAME) or not deepspeed.ops.__compatible_ops__.get(builder.NAME):
        return None
    folder = Path(_get_build_directory(builder.NAME, verbose=False))  # where torch's `load` builds it
    if (folder / f"{builder.NAME}.so").is_file():
        return None
    return f"compiling DeepSpeed's {builder.NAME} op once (usually 20–60 s) into {folder}"


def announce_jit_build(builder_name: str) -> None:
    """Print `jit_build_note` on rank 0 (ranks share the build, the others wait on its lock)."""
    note = jit_build_note(builder_name) if dist.is_main() else None
    if note:
        print(note, file=sys.stderr, flush=True)


def _optimizer_builder(config: dict[str, Any]) -> str | None:
    """The op builder of the Adam DeepSpeed picks for `config` (none for torch's own Adam)."""
    optimizer = config.get("optimizer", {}).get("params", {})
    if optimizer.get("torch_adam", False):
        return None
    offload = config.get("zero_optimization", {}).get("offload_optimizer")
    return "CPUAdamBuilder" if offload else "FusedAdamBuilder"


def build_engine(model: torch.nn.Module, recipe: Recipe):
    """`deepspeed.initialize` with the recipe-derived config, our groups and LR schedule."""
    import deepspeed

    config = build_ds_config(recipe, dist.world_size(), torch_adam=not torch.cuda.is_available())
    builder = _optimizer_builder(config)
    if builder is not None:
        announce_jit_build(builder)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, recipe), config=config,
        lr_scheduler=lambda opt: build_lr_scheduler(opt, recipe),
    )
    return engine, optimizer, scheduler


class EMA:
    """Exponential moving average of the trainable weights, kept in fp32 (a bf16 shadow would lose
    updates smaller than its precision).

    Under ZeRO-3 each rank averages only its own partition (`param.ds_tensor`), so the EMA is
    sharded exactly like the parameters and costs 1/world of a full copy; otherwise the full
    parameter is averaged. State dicts are per rank.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.params.items()}

    @staticmethod
    def _local(param: torch.nn.Parameter) -> torch.Tensor:
        return param.ds_tensor if hasattr(param, "ds_tensor") else param.data

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(self._local(param).float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, tensor in state.items():
            if name in self.shadow:
                self.shadow[name].copy_(tensor)
