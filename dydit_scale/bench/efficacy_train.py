"""Model and training loops of `dydit-bench efficacy`: one pre-training, one fine-tuning loop for every arm.

The task is rectified flow in pixel space (x_σ = (1 − σ)·x0 + σ·ε, the model predicts ε − x0 and
embeds 1000·σ): a model this small learns recognisable shapes from it in a few thousand CPU steps,
where DDPM ε-prediction still sampled noise at 32² in the same budget. Every arm is fine-tuned by
`finetune` with the same steps, data order (one seeded generator), AdamW and constant LR after a
short warm-up, so the arms differ only in what they are: the static model (control), a dynamic
model whose FLOPs loss w·(r̄ − λ_eff)² (Eq. 6) pulls its routers towards λ, or a pruned model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from dydit_scale.bench.efficacy_data import TEXT_DIM, Data
from dydit_scale.diffusion import FlowMatchingObjective
from dydit_scale.dynamic.budget import flops_loss, target_ratio_at
from dydit_scale.dynamic.flops import flops_ratio
from dydit_scale.dynamic.routers import Router

__all__ = ["TIME_SCALE", "Budget", "HeldOut", "build_static", "finetune", "pixart_forward", "pretrain"]

#: The transformer embeds 1000·σ, as PixArt embeds DDPM indices in [0, 1000).
TIME_SCALE = 1000.0
#: Share of training captions replaced by the null (all-zero) caption.
CAPTION_DROP = 0.1


def build_static(size: int, heads: int, head_dim: int, layers: int, patch: int, seed: int) -> nn.Module:
    """Stock PixArt-α transformer in pixel space: 3 channels in, 3 out (the velocity)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=3, out_channels=3, num_layers=layers,
        cross_attention_dim=heads * head_dim, sample_size=size, patch_size=patch, norm_num_groups=1,
        caption_channels=TEXT_DIM, use_additional_conditions=False, norm_type="ada_norm_single")


def pixart_forward(model: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The model's output for `timestep` = 1000·σ (the value a sampler passes and a schedule keys on)."""
    return model(x_t, encoder_hidden_states=text, timestep=timestep, added_cond_kwargs={"resolution": None,
                 "aspect_ratio": None}, return_dict=False)[0]


class HeldOut:
    """Fixed noise and stratified timesteps per held-out sample, so every model sees the same problem."""

    def __init__(self, data: Data, objective: FlowMatchingObjective, seed: int, batch: int):
        g = torch.Generator().manual_seed(seed + 11)
        self.noise = torch.randn(data.held_x.shape, generator=g)
        self.t = objective.sample_timesteps(data.held_x.shape[0], generator=g)
        self.data, self.objective, self.batch = data, objective, batch

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        """Mean held-out flow-matching loss (velocity MSE) in eval mode."""
        was_training = model.training
        model.eval()
        total, n = 0.0, self.data.held_x.shape[0]
        for i in range(0, n, self.batch):
            x0, noise, t = self.data.held_x[i:i + self.batch], self.noise[i:i + self.batch], self.t[i:i + self.batch]
            x_t = self.objective.add_noise(x0, noise, t)
            out = pixart_forward(model, x_t, t * TIME_SCALE, self.data.held_c[i:i + self.batch])
            total += float(self.objective.loss(out, x0, noise, t, x_t).sum())
        model.train(was_training)
        return total / n


def _batch(data: Data, objective: FlowMatchingObjective, batch: int, step: int, g: torch.Generator):
    """One seeded batch; `CAPTION_DROP` of the captions are zeroed, so the model also learns the
    unconditional velocity that classifier-free guidance needs (as PixArt trains)."""
    idx = torch.randint(0, data.train_x.shape[0], (batch,), generator=g)
    keep = (torch.rand(batch, generator=g) >= CAPTION_DROP).float()[:, None, None]
    x0, text = data.train_x[idx], data.train_c[idx] * keep
    noise = torch.randn(x0.shape, generator=g)
    t = objective.sample_timesteps(batch, generator=g, first_index=step * batch)
    return x0, text, noise, t, objective.add_noise(x0, noise, t)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: list[nn.Parameter]) -> None:
    """One optimiser step with the gradients of `clip` clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()


def pretrain(model: nn.Module, data: Data, held: HeldOut, *, batch: int, lr: float, steps: int,
             eval_every: int, decay_fraction: float, seed: int) -> dict:
    """AdamW warm-up → constant LR → linear decay to 0 over the last `decay_fraction` of `steps`.

    A fixed length (not "until flat") keeps the static model, and so every arm's starting point, the
    same from run to run; the held-out curve shows whether it is flat. Returns the curve [(step, loss)]
    (its last point is the final model) and seconds per step.
    """
    if not 0.0 <= decay_fraction < 1.0:
        raise ValueError(f"efficacy: --decay-fraction must be in [0, 1), got {decay_fraction}")
    objective = held.objective
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup, decay_from = max(1, min(100, steps // 10)), int(steps * (1 - decay_fraction))
    g = torch.Generator().manual_seed(seed + 3)
    curve = [(0, held.loss(model))]
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="efficacy: pre-train the static model", unit="step", leave=False)
    for step in bar:
        decay = (steps - step) / max(1, steps - decay_from) if step >= decay_from else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup, decay)
        x0, text, noise, t, x_t = _batch(data, objective, batch, step, g)
        loss = objective.loss(pixart_forward(model, x_t, t * TIME_SCALE, text), x0, noise, t, x_t).mean()
        _step(opt, loss, list(model.parameters()))
        if (step + 1) % eval_every == 0 and step + 1 < steps:
            curve.append((step + 1, held.loss(model)))
            bar.set_postfix(heldout=f"{curve[-1][1]:.4f}")
    seconds = time.perf_counter() - start
    curve.append((steps, held.loss(model)))
    return {"steps": steps, "curve": curve, "s_per_step": seconds / max(steps, 1), "seconds": seconds}


@dataclass(frozen=True)
class Budget:
    """The FLOPs target of a dynamic arm: λ_eff = 1 for `hold` steps, then a linear ramp to λ over
    `ramp` steps (the official schedule), with the router LR `router_lr_scale` × the weights' LR."""

    lam: float
    hold: int
    ramp: int
    router_lr_scale: float
    weight: float = 2.0


def finetune(model: nn.Module, data: Data, held: HeldOut, *, steps: int, batch: int, lr: float, seed: int,
             budget: Budget | None = None, desc: str = "efficacy: fine-tune",
             on_step: Callable[[], None] | None = None) -> tuple[nn.Module, list[dict]]:
    """Fine-tune `model` in place for `steps` steps; with a `budget` its routers learn the FLOPs target.

    The data order and the timestep/noise draws come from a generator seeded by `seed` alone, so
    every arm sees the same batches; the LR warms up over 2 % of the steps and then stays constant.
    The log holds the diffusion loss and, for dynamic models, the training FLOPs ratio and λ_eff.
    With `on_step` (a worker process reporting to its parent) it is called per step instead of a bar.
    """
    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    weights = [p for p in model.parameters() if id(p) not in routers]
    groups = [{"params": weights, "lr": lr, "base": lr}]
    if budget is not None and routers:
        router_lr = lr * budget.router_lr_scale
        groups.append({"params": [p for p in model.parameters() if id(p) in routers], "lr": router_lr,
                       "base": router_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    objective, g = held.objective, torch.Generator().manual_seed(seed + 5)
    warmup = max(1, math.ceil(0.02 * steps))
    model.train()
    log = []
    for step in range(steps) if on_step else tqdm(range(steps), desc=desc, unit="step", leave=False):
        for group in opt.param_groups:
            group["lr"] = group["base"] * min(1.0, (step + 1) / warmup)
        x0, text, noise, t, x_t = _batch(data, objective, batch, step, g)
        diffusion = objective.loss(pixart_forward(model, x_t, t * TIME_SCALE, text), x0, noise, t, x_t).mean()
        entry = {"step": step, "diffusion_loss": float(diffusion.detach())}
        loss = diffusion
        if budget is not None:
            ratio = flops_ratio(model)
            target = target_ratio_at(step, target=budget.lam, warmup_steps=budget.ramp, hold_steps=budget.hold,
                                     ramp_after_hold=True)
            loss = loss + flops_loss(ratio, target, weight=budget.weight, global_mean=False)
            entry.update(flops_ratio=float(ratio.detach().mean()), lambda_eff=target)
        _step(opt, loss, weights)
        log.append(entry)
        if on_step:
            on_step()
    return model.eval(), log
