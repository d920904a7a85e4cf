"""`dydit-bench efficacy`: quality against FLOPs of DyDiT fine-tunes of a small PixArt trained here.

No FID/CLIP weights exist offline, so efficacy is measured on a model this bench trains itself:
1. a stock `PixArtTransformer2DModel` (pixel space, learned σ) is pre-trained with AdamW on synthetic
   shape images until its held-out DDPM loss flattens (< `tolerance` relative gain over a window, or a
   cap), then with a linear LR decay to 0 (`decay_fraction` of all steps) so that it is converged;
2. for each λ a copy is made dynamic (`make_dynamic`, TDW heads + MLP groups, cross-attention heads
   too) and fine-tuned with DDPM loss + `flops_loss` for ≤ 3 % of the pre-training steps: routers
   start near-open (bias 4, σ ≈ 0.98) with a 25× router LR (the CPU demo recipe does likewise), because the
   default bias 15 cannot move in a few dozen steps; token routers (SDT) are off by default, so the
   exported schedule's FLOPs ratio is exactly what the fast path executes;
3. the router schedule is exported at the time keys of a DDIM sampler, applied (`apply_schedule`) and
   compared with the static model: schedule FLOPs ratio, held-out loss (fixed noise/timesteps, eval
   mode; the masked path with its eval-mode routers), PSNR of DDIM samples from the same noise and
   prompts, and static vs fast seconds per sampling step (best of interleaved rounds).
Writes `efficacy.json`, `efficacy.png` (held-out loss and PSNR vs FLOPs ratio) and `samples.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dydit_scale.bench.efficacy_train import (Data, HeldOut, build_static, finetune_dynamic, make_data, pixart_forward,
                                              pretrain)
from dydit_scale.bench.goals import Goal, goal_checks
from dydit_scale.diffusion import build_objective
from dydit_scale.dynamic.schedule import TokenShape
from dydit_scale.infer.export import export_schedule
from dydit_scale.infer.fast import apply_schedule
from dydit_scale.infer.keys import build_scheduler, sampler_time_keys
from dydit_scale.infer.plots import image_grid, save_png

__all__ = ["PRESETS", "add_arguments", "run", "measure"]

_DYNAMIC = dict(heads=True, mlp_groups=None, tokens=False, cross_attention=True, head_router_bias=4.0,
                token_router_bias=4.0, router_lr_scale=25.0)
#: name -> settings; `finetune_min` gives the tiny test preset 30 steps (3 % of ~100 would be 3, too few for
#: its routers to move: at 8 steps the exported ratio was still 0.98).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(size=16, heads=4, head_dim=8, layers=2, batch=16, count=512, heldout=64, lr=2e-3,
                 window=25, cap=100, min_steps=50, lambdas=[0.5], finetune_min=30, sample_steps=10, samples=4,
                 help="16² images, C = 32, 2 blocks, ≤ 100 pre-training steps, λ = 0.5 (for tests)"),
    "default": dict(size=32, heads=4, head_dim=32, layers=4, batch=16, count=3000, heldout=128, lr=1e-3,
                    window=100, cap=4000, min_steps=1000, lambdas=[0.7, 0.5], finetune_min=0, sample_steps=20,
                    samples=8, help="32² images (256 tokens), C = 128, 4 heads, 4 blocks, λ ∈ {0.7, 0.5}"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="default",
                        help="; ".join(f"{k}: {v['help']}" for k, v in PRESETS.items()))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", default="runs/efficacy", help="folder for efficacy.json and the PNGs")
    parser.add_argument("--lambdas", type=float, nargs="+", default=None, help="FLOPs budgets; unset = the preset's")
    parser.add_argument("--cap", type=int, default=None, help="pre-training step cap; unset = the preset's")
    parser.add_argument("--extra-fraction", type=float, default=0.03,
                        help="fine-tuning steps per λ as a fraction of the pre-training steps")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="stop pre-training when the held-out loss improved less than this over a window")
    parser.add_argument("--decay-fraction", type=float, default=0.2,
                        help="share of the pre-training steps that decay the LR linearly to 0 once the loss is flat")
    parser.add_argument("--router-lr-scale", type=float, default=_DYNAMIC["router_lr_scale"],
                        help="router LR multiplier over the fine-tuning LR (pre-training LR / 2)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, init and routers")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [-1, 1] mapped to [0, 1]."""
    mse = (((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).reshape(a.shape[0], -1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


@torch.no_grad()
def _sample(model: nn.Module, sampler: dict, noise: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, float]:
    """DDIM by hand with the recorded scheduler (ε = first 3 output channels); (images, s/step)."""
    scheduler = build_scheduler(sampler)
    scheduler.set_timesteps(sampler["steps"])
    x, seconds = noise.clone(), 0.0
    for t in scheduler.timesteps:
        start = time.perf_counter()
        out = pixart_forward(model, x, t.reshape(1).expand(x.shape[0]), text)
        seconds += time.perf_counter() - start
        x = scheduler.step(out[:, :3], t, x).prev_sample
    return x, seconds / len(scheduler.timesteps)


def _timed_samples(static: nn.Module, fast: nn.Module, sampler: dict, noise: torch.Tensor,
                   text: torch.Tensor, rounds: int = 2) -> tuple[torch.Tensor, float, float]:
    """Fast-path samples and the best s/step of each path over alternating rounds (first fills caches)."""
    best = {"static": math.inf, "fast": math.inf}
    images = None
    for _ in range(rounds):
        for name, model in (("static", static), ("fast", fast)):
            out, s = _sample(model, sampler, noise, text)
            best[name] = min(best[name], s)
            images = out if name == "fast" else images
    return images, best["static"], best["fast"]


def _plot(static_loss: float, rows: list[dict], path: Path) -> Path:
    """Held-out loss and PSNR vs schedule FLOPs ratio; the static model is the point at ratio 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dydit_scale.infer.plots import _figure_to_array

    ratios = [r["flops_ratio"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    ax1.plot([1.0] + ratios, [static_loss] + [r["heldout_loss"] for r in rows], "o-", color="tab:blue")
    ax1.axhline(static_loss * 1.02, ls="--", color="grey", lw=0.8, label="static + 2 %")
    for r in rows:
        ax1.annotate(f"λ={r['lambda']}", (r["flops_ratio"], r["heldout_loss"]), textcoords="offset points",
                     xytext=(4, 4), fontsize=8)
    ax1.annotate("static", (1.0, static_loss), textcoords="offset points", xytext=(-30, 6), fontsize=8)
    ax1.set(xlabel="FLOPs ratio (exported schedule)", ylabel="held-out DDPM loss", title="held-out loss vs FLOPs")
    ax1.legend(fontsize=8)
    psnr = [r["psnr_vs_static"] for r in rows]
    ax2.plot(ratios, psnr, "s-", color="tab:red")
    top = max(psnr) + 5 if psnr else 40
    ax2.plot([1.0], [top], marker="^", color="black")
    ax2.annotate("static (reference, ∞ dB)", (1.0, top), textcoords="offset points", xytext=(-120, -12), fontsize=8)
    for r in rows:
        ax2.annotate(f"λ={r['lambda']}", (r["flops_ratio"], r["psnr_vs_static"]), textcoords="offset points",
                     xytext=(4, 4), fontsize=8)
    ax2.set(xlabel="FLOPs ratio (exported schedule)", ylabel="PSNR vs static samples (dB)",
            title="sample fidelity vs FLOPs")
    for ax in (ax1, ax2):
        ax.set_xlim(min(ratios + [1.0]) - 0.08, 1.05)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(_figure_to_array(fig), path)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Pre-train, fine-tune per λ, export + apply schedules, evaluate; see the module doc."""
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    p = dict(PRESETS[args.preset])
    lambdas = args.lambdas or p["lambdas"]
    cap = args.cap or p["cap"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data: Data = make_data(p["count"], p["heldout"], p["size"], args.seed)
    held = HeldOut(data, build_objective("ddpm"), args.seed, batch=64)
    static = build_static(p["size"], p["heads"], p["head_dim"], p["layers"], args.seed)
    pre = pretrain(static, data, held, batch=p["batch"], lr=p["lr"], window=p["window"], cap=cap,
                   min_steps=min(p["min_steps"], cap), tolerance=args.tolerance,
                   decay_fraction=args.decay_fraction, seed=args.seed)
    static.eval()
    static_loss = pre["curve"][-1][1]
    ft_steps = max(p["finetune_min"], int(args.extra_fraction * pre["steps"]))
    keys = sampler_time_keys("pixart", steps=p["sample_steps"], resolution=(p["size"], p["size"]), sampler="ddim")
    shape = TokenShape(image_tokens=(p["size"] // 2) ** 2, text_tokens=data.held_c.shape[1])
    n = p["samples"]
    noise = torch.randn((n, 3, p["size"], p["size"]), generator=torch.Generator().manual_seed(args.seed + 13))
    text = data.held_c[:n]
    reference, _ = _sample(static, keys.sampler, noise, text)
    rows, grids = [], [reference]
    dynamic = dict(_DYNAMIC, router_lr_scale=args.router_lr_scale)
    for lam in lambdas:
        model, log = finetune_dynamic(static, data, held, lam=lam, steps=ft_steps, batch=p["batch"], lr=p["lr"] / 2,
                                      dynamic=dynamic, seed=args.seed)
        loss = held.loss(model)
        schedule = export_schedule(model, keys, token_shape=shape, source={"bench": "efficacy", "lambda": lam})
        schedule.save(out / f"schedule-lam{lam}")
        fast = apply_schedule(copy.deepcopy(model), schedule)
        images, s_static, s_fast = _timed_samples(static, fast, keys.sampler, noise, text)
        grids.append(images)
        ratio = float(schedule.flops_ratio.mean())
        row = {"lambda": lam, "flops_ratio": ratio, "heldout_loss": loss, "static_heldout_loss": static_loss,
               "heldout_loss_rel": loss / static_loss - 1.0, "psnr_vs_static": _psnr(images, reference),
               "speedup": s_static / s_fast, "static_s_per_step": s_static, "fast_s_per_step": s_fast,
               "train_flops_ratio_last": log[-1]["flops_ratio"] if log else 1.0}
        checks = row_goals(row)
        row.update(ratio_goal_met=checks["flops_ratio"].met, loss_goal_met=checks["heldout_loss"].met,
                   goal_checks=goal_checks(checks))
        rows.append(row)
    plot = _plot(static_loss, rows, out / "efficacy.png")
    pictures = torch.cat(grids).permute(0, 2, 3, 1).add(1).div(2).numpy()
    save_png(image_grid(pictures, rows=len(grids)), out / "samples.png")
    result = {"rows": rows, "preset": args.preset, "lambdas": lambdas, "static_heldout_loss": static_loss,
              "pretrain": {k: pre[k] for k in ("steps", "converged", "decay_steps", "curve", "s_per_step", "seconds")},
              "finetune_steps_per_lambda": ft_steps, "extra_step_fraction": ft_steps / max(pre["steps"], 1),
              "sampler": {"name": "ddim", "steps": p["sample_steps"], "samples": n},
              "token_routers": bool(_DYNAMIC["tokens"]), "dynamic": dynamic, "threads": args.threads,
              "seconds": time.perf_counter() - start, "out": str(out), "plot": str(plot),
              "samples_png": str(out / "samples.png")}
    (out / "efficacy.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def row_goals(row: dict[str, Any]) -> dict[str, Goal]:
    """A λ's goals: the schedule's FLOPs ratio within 0.03 of λ, held-out loss at most 2 % above static."""
    return {"flops_ratio": Goal(abs(row["flops_ratio"] - row["lambda"]), "<=", 0.03),
            "heldout_loss": Goal(row["heldout_loss_rel"], "<=", 0.02, "+2 %")}


def _goal_marks(row: dict[str, Any]) -> str:
    """"ratio met, loss MISSED" for the table's goals column."""
    return ", ".join(f"{name} {'met' if goal.met else 'MISSED'}"
                     for name, goal in zip(("ratio", "loss"), row_goals(row).values()))


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    pre = result["pretrain"]
    stop = "flattened" if pre["converged"] else "hit the cap"
    print(f"preset {result['preset']}: pre-trained {pre['steps']} steps ({stop}, {pre['decay_steps']} of LR decay, "
          f"{pre['s_per_step']:.2f} s/step), static held-out loss {result['static_heldout_loss']:.4f}; "
          f"fine-tune {result['finetune_steps_per_lambda']} steps per λ "
          f"({100 * result['extra_step_fraction']:.1f} % extra); DDIM {result['sampler']['steps']} steps")
    print(f"{'λ':>5}{'FLOPs':>8}{'|r-λ|':>7}{'loss':>9}{'static':>9}{'Δloss':>8}{'PSNR dB':>9}"
          f"{'static s/st':>12}{'fast s/st':>10}{'speed-up':>9}  goals")
    for r in result["rows"]:
        print(f"{r['lambda']:>5.2f}{r['flops_ratio']:>8.3f}{abs(r['flops_ratio'] - r['lambda']):>7.3f}"
              f"{r['heldout_loss']:>9.4f}{r['static_heldout_loss']:>9.4f}{100 * r['heldout_loss_rel']:>7.1f}%"
              f"{r['psnr_vs_static']:>9.2f}{r['static_s_per_step']:>12.4f}{r['fast_s_per_step']:>10.4f}"
              f"{r['speedup']:>9.2f}  {_goal_marks(r)}")
    print(f"goals: |ratio − λ| ≤ 0.03, loss ≤ static + 2 %; wrote {result['out']} "
          f"({result['seconds']:.0f} s)")
    return 0
