"""What `dydit-bench efficacy` measures on one trained arm: samples and their scores, realised FLOPs,
how decided the routers are, and wall time per sampling step."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dydit_scale.bench.efficacy_score import AttributeClassifier, features, frechet_distance, prompt_score
from dydit_scale.bench.efficacy_train import TIME_SCALE, HeldOut, pixart_forward
from dydit_scale.dynamic.flops import flops_ratio
from dydit_scale.dynamic.routers import TokenRouter
from dydit_scale.dynamic.schedule import TimeKeys
from dydit_scale.infer.export import timestep_routers
from dydit_scale.infer.keys import build_scheduler

__all__ = ["Prompts", "Scorer", "euler_time_keys", "realised_flops", "sample", "step_seconds", "undecided_share"]

#: A router logit this close to 0 still flips with the training noise: the unit is not decided yet.
UNDECIDED = 2.0


@dataclass
class Prompts:
    """The prompts every arm samples, with the same starting noise: caption embeddings [N, T, D],
    their attribute labels [N, 4] and x_T [N, 3, S, S]."""

    text: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor


def euler_time_keys(steps: int) -> TimeKeys:
    """The timesteps (1000·σ, unshifted) a flow-matching Euler sampler of `steps` steps passes the model."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(steps)
    record = {"name": "flow_euler", "class": type(scheduler).__name__, "steps": steps,
              "config": {k: v for k, v in scheduler.config.items() if not k.startswith("_")}}
    return TimeKeys(scheduler.timesteps.clone(), definition="1000·σ of rectified flow", sampler=record)


@torch.no_grad()
def sample(model: nn.Module, sampler: dict, prompts: Prompts, guidance: float, batch: int = 128,
           on_start: Callable[[], None] | None = None, on_end: Callable[[], None] | None = None) -> torch.Tensor:
    """Euler steps of the recorded flow-matching scheduler with classifier-free guidance, images in [-1, 1].

    The null and the real caption run as one batch, v = v_∅ + g·(v_c − v_∅), as PixArt's pipeline does.
    `on_start` and `on_end` run around each batch's generation (a step cache's bookkeeping).
    """
    scheduler = build_scheduler(sampler)
    images = []
    for i in range(0, prompts.noise.shape[0], batch):
        if on_start is not None:
            on_start()
        x, text = prompts.noise[i:i + batch].clone(), prompts.text[i:i + batch]
        both = torch.cat([torch.zeros_like(text), text])
        scheduler.set_timesteps(sampler["steps"])
        for t in scheduler.timesteps:
            null, cond = pixart_forward(model, torch.cat([x, x]), t.reshape(1).expand(2 * x.shape[0]), both).chunk(2)
            x = scheduler.step(null + guidance * (cond - null), t, x).prev_sample
        images.append(x.clamp(-1, 1))
        if on_end is not None:
            on_end()
    return torch.cat(images)


class Scorer:
    """Held-out loss, prompt score and Fréchet distance of an arm, against fixed references."""

    def __init__(self, held: HeldOut, classifier: AttributeClassifier, sampler: dict, prompts: Prompts,
                 guidance: float):
        self.held, self.classifier, self.sampler, self.prompts = held, classifier, sampler, prompts
        self.guidance = guidance
        self.real_features = features(classifier, held.data.held_x)

    def __call__(self, loss_model: nn.Module, sample_model: nn.Module) -> tuple[dict[str, float], torch.Tensor]:
        """Scores of `loss_model` on held-out data and of `sample_model`'s samples (the fast path of a
        dynamic arm, the model itself otherwise); also returns the samples."""
        images = sample(sample_model, self.sampler, self.prompts, self.guidance)
        return {"heldout_loss": self.held.loss(loss_model)} | self.image_scores(images), images

    def image_scores(self, images: torch.Tensor) -> dict[str, float]:
        """Prompt score and FD of samples of `prompts`."""
        return {"prompt_score": prompt_score(self.classifier, images, self.prompts.labels),
                "fd": frechet_distance(features(self.classifier, images), self.real_features)}


@torch.no_grad()
def realised_flops(model: nn.Module, held: HeldOut, time_keys: torch.Tensor, batch: int = 128) -> dict[str, float]:
    """FLOPs ratio the eval-mode model really spends at the sampler's time keys on held-out images,
    token routers' keep rate included, and the share of token-router logits with |z| < 2."""
    model.eval()
    ratios, kept, undecided, logits_seen = [], [], 0, 0

    def count(router: TokenRouter, inputs: tuple, _out: torch.Tensor) -> None:
        nonlocal undecided, logits_seen
        z = router.fc2(torch.relu(router.fc1(inputs[0]))).squeeze(-1)
        undecided += int((z.abs() < UNDECIDED).sum())
        logits_seen += z.numel()
        kept.append(float(router.decision.float().mean()))

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, TokenRouter)]
    try:
        x0_all = held.data.held_x
        for value in time_keys:
            for i in range(0, x0_all.shape[0], batch):
                x0 = x0_all[i:i + batch]
                timestep = value.reshape(1).expand(x0.shape[0])
                x_t = held.objective.add_noise(x0, held.noise[i:i + batch], timestep / TIME_SCALE)
                pixart_forward(model, x_t, timestep, held.data.held_c[i:i + batch])
                ratios.append(flops_ratio(model))
    finally:
        for hook in hooks:
            hook.remove()
    return {"flops_ratio": float(torch.cat(ratios).mean()),
            "token_keep_rate": sum(kept) / len(kept) if kept else 1.0,
            "token_undecided_share": undecided / logits_seen if logits_seen else 0.0}


@torch.no_grad()
def undecided_share(model: nn.Module, time_keys: torch.Tensor) -> float:
    """Share of timestep-router logits with |z| < 2 at the exported time keys."""
    e_t = model.timestep_embedding(time_keys, time_keys.shape[0])
    logits = torch.cat([router.proj(e_t).flatten() for router in timestep_routers(model).values()])
    return float((logits.abs() < UNDECIDED).float().mean())


@torch.no_grad()
def step_seconds(models: dict[str, nn.Module], prompts: Prompts, time_keys: torch.Tensor, *, batch: int = 64,
                 rounds: int = 3) -> dict[str, float]:
    """Best seconds per sampling step of each model, measured in alternation (round-robin, so that
    machine noise hits every model alike); the first round also fills the fast path's caches."""
    x, text = prompts.noise[:batch], prompts.text[:batch]
    best = dict.fromkeys(models, math.inf)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for value in time_keys:
                pixart_forward(model, x, value.reshape(1).expand(x.shape[0]), text)
            best[name] = min(best[name], (time.perf_counter() - start) / len(time_keys))
    return best
