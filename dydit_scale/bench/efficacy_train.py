"""Data, model and training loops of `dydit-bench efficacy` (kept apart so the bench module stays readable).

Everything is in memory and deterministic in the seed: synthetic shape images (`synthetic_image`) in
pixel space, captions embedded by a frozen random word table (no hub weights offline; the captions
name size, colour, shape and place, so the table carries real conditioning), a small stock diffusers
`PixArtTransformer2DModel` with learned σ, plain torch AdamW and the library's DDPM objective.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dydit_scale.config import DynamicConfig
from dydit_scale.data.synthetic import synthetic_image
from dydit_scale.diffusion import DDPMObjective
from dydit_scale.dynamic.budget import flops_loss, target_ratio_at
from dydit_scale.dynamic.flops import flops_ratio
from dydit_scale.models.convert import make_dynamic

__all__ = ["Data", "HeldOut", "pixart_forward", "make_data", "build_static", "pretrain", "finetune_dynamic"]

TEXT_TOKENS = 8  # "a small red circle at the top left" has 8 words; shorter captions are padded
TEXT_DIM = 32


@dataclass
class Data:
    """Images in [-1, 1] [N, 3, S, S] and caption embeddings [N, TEXT_TOKENS, TEXT_DIM], split."""

    train_x: torch.Tensor
    train_c: torch.Tensor
    held_x: torch.Tensor
    held_c: torch.Tensor
    held_captions: list[str] = field(default_factory=list)


def _embed_captions(captions: list[str], seed: int) -> torch.Tensor:
    """Frozen random word-embedding table (seeded, sorted vocabulary) → [N, TEXT_TOKENS, TEXT_DIM]."""
    vocab = sorted({word for caption in captions for word in caption.split()} | {"<pad>"})
    table = torch.randn(len(vocab), TEXT_DIM, generator=torch.Generator().manual_seed(seed + 7))
    index = {word: i for i, word in enumerate(vocab)}
    ids = [[index[w] for w in c.split()][:TEXT_TOKENS] for c in captions]
    ids = torch.tensor([row + [index["<pad>"]] * (TEXT_TOKENS - len(row)) for row in ids])
    return table[ids]


def make_data(count: int, heldout: int, size: int, seed: int) -> Data:
    """`count` training + `heldout` held-out samples (disjoint indices) of `synthetic_image` at size²."""
    from PIL import Image

    images, captions = [], []
    for index in range(count + heldout):
        data, caption, _ = synthetic_image(index, seed=seed, size=(size, size), image_format="png")
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        captions.append(caption)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    c = _embed_captions(captions, seed)
    return Data(x[:count], c[:count], x[count:], c[count:], captions[count:])


def build_static(size: int, heads: int, head_dim: int, layers: int, seed: int) -> nn.Module:
    """Stock PixArt-α transformer in pixel space: 3 channels in, 6 out (ε + learned σ), patch 2."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=3, out_channels=6, num_layers=layers,
        cross_attention_dim=heads * head_dim, sample_size=size, patch_size=2, norm_num_groups=1,
        caption_channels=TEXT_DIM, use_additional_conditions=False, norm_type="ada_norm_single")


def pixart_forward(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return model(x_t, encoder_hidden_states=text, timestep=t, added_cond_kwargs={"resolution": None,
                 "aspect_ratio": None}, return_dict=False)[0]


class HeldOut:
    """Fixed noise and stratified timesteps per held-out sample, so every model sees the same problem."""

    def __init__(self, data: Data, objective: DDPMObjective, seed: int, batch: int):
        g = torch.Generator().manual_seed(seed + 11)
        self.noise = torch.randn(data.held_x.shape, generator=g)
        self.t = objective.sample_timesteps(data.held_x.shape[0], generator=g)
        self.data, self.objective, self.batch = data, objective, batch

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        """Mean held-out DDPM loss (ε-MSE + L_vb) in eval mode."""
        was_training = model.training
        model.eval()
        total = 0.0
        x0_all, n = self.data.held_x, self.data.held_x.shape[0]
        for i in range(0, n, self.batch):
            x0, noise, t = x0_all[i:i + self.batch], self.noise[i:i + self.batch], self.t[i:i + self.batch]
            x_t = self.objective.add_noise(x0, noise, t)
            out = pixart_forward(model, x_t, t, self.data.held_c[i:i + self.batch])
            total += float(self.objective.loss(out, x0, noise, t, x_t).sum())
        model.train(was_training)
        return total / n


def _batch(data: Data, objective: DDPMObjective, batch: int, step: int, g: torch.Generator):
    idx = torch.randint(0, data.train_x.shape[0], (batch,), generator=g)
    x0, text = data.train_x[idx], data.train_c[idx]
    noise = torch.randn(x0.shape, generator=g)
    t = objective.sample_timesteps(batch, generator=g, first_index=step * batch)
    return x0, text, noise, t, objective.add_noise(x0, noise, t)


def pretrain(model: nn.Module, data: Data, held: HeldOut, *, batch: int, lr: float, window: int, cap: int,
             min_steps: int, tolerance: float, decay_fraction: float, seed: int) -> dict:
    """AdamW warm-up → constant LR until flat → linear decay to 0 (warm-up-stable-decay).

    The constant phase ends once the held-out loss improved less than `tolerance` (relative) over the
    last `window` steps (after `min_steps`), or at `cap`·(1 − `decay_fraction`); the decay then takes
    `decay_fraction` of all steps, so the static model is converged rather than caught mid-noise and
    the total stays ≤ `cap`. Returns the steps taken, the held-out curve [(step, loss)] (its last
    point is the final model), whether the loss flattened before the cap, and seconds per step.
    """
    if not 0.0 <= decay_fraction < 1.0:
        raise ValueError(f"efficacy: --decay-fraction must be in [0, 1), got {decay_fraction}")
    objective = held.objective
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(50, cap // 10))
    stable_cap = max(1, int(cap * (1 - decay_fraction)))
    g = torch.Generator().manual_seed(seed + 3)
    curve = [(0, held.loss(model))]
    model.train()
    start, step, end, flattened = time.perf_counter(), 0, cap, False
    decay_from, decay_steps = None, 0
    bar = tqdm(total=cap, desc="efficacy: pre-train (until flat, then LR decay)", unit="step", leave=False)
    while step < end:
        factor = min(1.0, (step + 1) / warmup) if decay_from is None else 1.0 - (step - decay_from) / decay_steps
        for group in opt.param_groups:
            group["lr"] = lr * factor
        x0, text, noise, t, x_t = _batch(data, objective, batch, step, g)
        loss = objective.loss(pixart_forward(model, x_t, t, text), x0, noise, t, x_t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update()
        if decay_from is None and (step % window == 0 or step == stable_cap):
            curve.append((step, held.loss(model)))
            prev, cur = curve[-2][1], curve[-1][1]
            bar.set_postfix(heldout=f"{cur:.4f}")
            flattened = step >= min_steps and (prev - cur) / abs(prev) < tolerance
            if flattened or step >= stable_cap:
                decay_from, decay_steps = step, round(step * decay_fraction / (1 - decay_fraction))
                end = step + decay_steps
                bar.total = end
    bar.close()
    seconds = time.perf_counter() - start
    curve.append((step, held.loss(model)))
    return {"steps": step, "curve": curve, "s_per_step": seconds / max(step, 1), "seconds": seconds,
            "converged": flattened, "decay_steps": decay_steps}


def finetune_dynamic(static: nn.Module, data: Data, held: HeldOut, *, lam: float, steps: int, batch: int,
                     lr: float, dynamic: dict, seed: int) -> tuple[nn.Module, list[dict]]:
    """A dynamic copy of `static` trained `steps` steps on DDPM loss + FLOPs loss towards λ.

    λ_eff ramps from 1 to λ over the first half of the steps (no hold); in the second half the weights
    adapt to the final widths while their LR decays linearly to 0 (the static model ended its own
    decay converged); routers keep `router_lr_scale` × lr (they start near-open, σ(bias)). The global
    RNG (router noise) is seeded per λ, so each row is reproducible whatever ran before it.
    """
    import copy

    torch.manual_seed(seed + round(1000 * lam))
    config = DynamicConfig(target_flops_ratio=lam, **dynamic)
    model = make_dynamic(copy.deepcopy(static), config).train()
    routers = [p for n, p in model.named_parameters() if "router" in n]
    others = [p for n, p in model.named_parameters() if "router" not in n]
    opt = torch.optim.AdamW([{"params": others, "lr": lr},
                             {"params": routers, "lr": lr * config.router_lr_scale}], weight_decay=0.0)
    objective = held.objective
    g = torch.Generator().manual_seed(seed + 5)
    warmup = max(1, math.ceil(steps / 2))
    log = []
    for step in tqdm(range(steps), desc=f"efficacy: fine-tune λ={lam}", unit="step", leave=False):
        opt.param_groups[0]["lr"] = lr * min(1.0, (steps - step) / max(1, steps - warmup))
        x0, text, noise, t, x_t = _batch(data, objective, batch, step, g)
        diffusion = objective.loss(pixart_forward(model, x_t, t, text), x0, noise, t, x_t).mean()
        ratio = flops_ratio(model)
        target = target_ratio_at(step, target=lam, warmup_steps=warmup, hold_steps=0)
        f_loss = flops_loss(ratio, target, weight=config.flops_loss_weight, global_mean=False)
        opt.zero_grad(set_to_none=True)
        (diffusion + f_loss).backward()
        torch.nn.utils.clip_grad_norm_(others, 1.0)
        opt.step()
        log.append({"step": step, "diffusion_loss": float(diffusion.detach()),
                    "flops_ratio": float(ratio.detach().mean()), "lambda_eff": target})
    return model.eval(), log
