"""The goals, table and pictures of `dydit-bench efficacy`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dydit_scale.bench.efficacy_cache import cache_cause, cache_goals, print_cache_table
from dydit_scale.bench.efficacy_data import caption_of
from dydit_scale.bench.efficacy_eval import Prompts
from dydit_scale.bench.goals import Goal
from dydit_scale.infer.plots import labelled_grid, pyplot, save_figure, save_png

__all__ = ["print_table", "result_goals", "save_pictures"]

_METRICS = (("heldout_loss", "held-out flow-matching loss", "lower is better"),
            ("prompt_score", "prompt score", "higher"),
            ("fd", "Fréchet distance (classifier features)", "lower"))


def _dynamic(result: dict[str, Any], lam: float) -> dict[str, Any]:
    return next(r for r in result["rows"] if r["arm"] == "dynamic" and r["lambda"] == lam)


def _pruned(result: dict[str, Any], lam: float) -> dict[str, Any]:
    return next(r for r in result["rows"] if r["arm"] == "pruned" and r["lambda"] == lam)


def result_goals(result: dict[str, Any]) -> dict[str, Goal]:
    """Every goal of a run, by name: the exported ratio hits λ; at λ 0.7 quality stays with the control;
    at every λ ≤ 0.7 the dynamic model beats pruning at the same FLOPs; the static model and the judge
    are good enough to mean something; the default preset's wall time."""
    goals = {"classifier accuracy": Goal(result["classifier_accuracy"], ">=", 0.95, "95 %"),
             "static prompt score": Goal(result["static"]["prompt_score"], ">=", 0.90, "90 %")}
    control = result["control"]
    for lam in sorted({r["lambda"] for r in result["rows"]}, reverse=True):
        dynamic, pruned = _dynamic(result, lam), _pruned(result, lam)
        goals[f"λ {lam}: |ratio − λ|"] = Goal(abs(dynamic["flops_ratio"] - lam), "<=", 0.03)
        if lam == 0.7:
            goals["λ 0.7: loss vs control"] = Goal(dynamic["heldout_loss"] / control["heldout_loss"] - 1, "<=", 0.02,
                                                    "+2 %")
            goals["λ 0.7: prompt score vs control"] = Goal(dynamic["prompt_score"] - control["prompt_score"], ">=",
                                                           -0.02, "−2 points")
        if lam <= 0.7:
            loss_gap = pruned["heldout_loss"] - dynamic["heldout_loss"]
            goals[f"λ {lam}: loss, pruned − dynamic"] = Goal(loss_gap, ">=", 0)
            goals[f"λ {lam}: FD, pruned − dynamic"] = Goal(pruned["fd"] - dynamic["fd"], ">=", 0)
    if "cache" in result:
        goals |= cache_goals(result)
    if result["preset"] == "default":
        limit = 40 if result["pretrain"]["reused"] else 60
        goals["minutes"] = Goal(result["seconds"] / 60, "<=", limit)
    return goals


def _cause(name: str, result: dict[str, Any]) -> str:
    """Why a goal was missed, from the numbers the run recorded."""
    if name.startswith("classifier"):
        return "the judge is under-trained: its prompt scores are not trustworthy"
    if name.startswith("static"):
        return "the static model does not follow prompts yet: raise --pretrain-steps"
    if name == "minutes":
        return "this machine is slower than 2 free cores, or the steps were raised"
    if " + " in name.split(":")[0]:
        return cache_cause(name, result)
    lam = float(name.split(":")[0].removeprefix("λ "))
    row = _dynamic(result, lam)
    if "ratio" in name:
        return (f"trained at {row['train_flops_ratio']:.3f}, exported width {row['schedule_flops_ratio']:.3f}, "
                f"tokens kept {row['token_keep_rate']:.0%}; router logits |z| < 2: "
                f"{row['undecided_share']:.0%} (width), {row['token_undecided_share']:.0%} (tokens)")
    pruned = _pruned(result, lam)
    if "FD" in name:
        return (f"FD {row['fd']:.2f} (dynamic, {row['flops_ratio']:.3f} FLOPs) against {pruned['fd']:.2f} (pruned, "
                f"{pruned['flops_ratio']:.3f}); FD of {result['sampler']['samples']} samples is biased and noisy "
                f"(real images redrawn for the same prompts: {result['fd_real']:.2f}), so a gap of a few tenths "
                "is noise")
    return (f"dynamic at {row['flops_ratio']:.3f}: loss {row['heldout_loss']:.4f}, prompt {row['prompt_score']:.1%}, "
            f"FD {row['fd']:.2f}; pruned at {pruned['flops_ratio']:.3f}: loss {pruned['heldout_loss']:.4f}, "
            f"FD {pruned['fd']:.2f}; control loss {result['control']['heldout_loss']:.4f}, "
            f"prompt {result['control']['prompt_score']:.1%}")


def print_table(result: dict[str, Any]) -> None:
    pre, sampler = result["pretrain"], result["sampler"]
    print(f"preset {result['preset']}: static model {'loaded' if pre['reused'] else 'pre-trained'} "
          f"({pre['steps']} steps); every arm fine-tuned {result['finetune_steps']} steps; "
          f"{sampler['samples']} samples per arm, Euler {sampler['steps']} steps, guidance {sampler['guidance']}; "
          f"classifier accuracy {result['classifier_accuracy']:.1%}; FD of real images redrawn for the prompts "
          f"{result['fd_real']:.2f}")
    print(f"{'arm':<9}{'λ':>5}{'FLOPs':>8}{'loss':>9}{'Δ ctrl':>8}{'prompt':>8}{'FD':>8}{'speed-up':>9}")
    control = result["control"]
    lines = [("static", None, 1.0, result["static"], 1.0), ("control", None, 1.0, control, None)]
    lines += [(r["arm"], r["lambda"], r["flops_ratio"], r, r["speedup"]) for r in result["rows"]]
    for arm, lam, ratio, r, speedup in lines:
        delta = 100 * (r["heldout_loss"] / control["heldout_loss"] - 1)
        print(f"{arm:<9}{'' if lam is None else f'{lam:.2f}':>5}{ratio:>8.3f}{r['heldout_loss']:>9.4f}"
              f"{delta:>7.1f}%{100 * r['prompt_score']:>7.1f}%{r['fd']:>8.2f}"
              f"{'' if speedup is None else f'{speedup:.2f}×':>9}")
    print(f"{'dynamic':<9}{'λ':>5}{'realised':>10}{'width only':>12}{'training':>10}{'tokens kept':>13}"
          f"{'|z| < 2 width / tokens':>24}")
    for r in (r for r in result["rows"] if r["arm"] == "dynamic"):
        print(f"{'':<9}{r['lambda']:>5.2f}{r['flops_ratio']:>10.3f}{r['schedule_flops_ratio']:>12.3f}"
              f"{r['train_flops_ratio']:>10.3f}{r['token_keep_rate']:>13.1%}"
              f"{r['undecided_share']:>15.1%} / {r['token_undecided_share']:.1%}")
    if "cache" in result:
        print_cache_table(result)
    print("goals:")
    for name, goal in result_goals(result).items():
        line = f"  {name}: {goal.value:.4g} {goal.mark()}"
        print(line if goal.met else f"{line} ({_cause(name, result)})")
    print(f"wrote {result['out']} ({result['seconds'] / 60:.1f} min)")


def _pareto(result: dict[str, Any]):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    for ax, (key, label, better) in zip(axes, _METRICS):
        for arm, style in (("dynamic", "o-"), ("pruned", "s--")):
            rows = sorted((r for r in result["rows"] if r["arm"] == arm), key=lambda r: r["flops_ratio"])
            ax.plot([r["flops_ratio"] for r in rows], [r[key] for r in rows], style, label=arm)
            for r in rows:
                ax.annotate(f"λ {r['lambda']}", (r["flops_ratio"], r[key]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.plot([1.0], [result["static"][key]], "k*", markersize=11, label="static")
        ax.plot([1.0], [result["control"][key]], "D", color="tab:green", label="control (fine-tuned static)")
        ax.set(xlabel="FLOPs ratio (realised at inference)", ylabel=label, title=f"{label} ({better})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_pictures(result: dict[str, Any], images: dict[str, torch.Tensor], prompts: Prompts,
                  shown: int) -> tuple[Path, Path]:
    """efficacy.png (the Pareto plot) and samples.png (rows: arms, columns: the first `shown` prompts)."""
    out = Path(result["out"])
    plot = save_figure(_pareto(result), out / "efficacy.png")
    ratios = {f"{r['arm']} λ={r['lambda']}": r["flops_ratio"] for r in result["rows"]}
    names = list(images)
    labels = [name if name not in ratios else f"{name} ({ratios[name]:.2f} FLOPs)" for name in names]
    pictures = torch.cat([images[name][:shown] for name in names]).permute(0, 2, 3, 1).add(1).div(2)
    captions = [caption_of(row) for row in prompts.labels[:shown]]
    grid = labelled_grid(np.asarray(pictures.numpy()), captions, labels, cell=96)
    return plot, save_png(grid, out / "samples.png")
