"""Fine-tune and score the arms of `dydit-bench efficacy`, in worker processes when there are cores for it.

Arms are independent once the static model exists, and on a small CPU two one-thread processes
train faster than one two-thread process, so `run_arms` spreads them over `workers` processes: each
rebuilds the (seeded) data and loads the static model and the classifier once, then runs jobs. A
pruned arm needs its dynamic arm's realised FLOPs ratio, so it is queued when that one finishes.
"""

from __future__ import annotations

import argparse
import copy
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dydit_scale.bench.efficacy_data import make_data
from dydit_scale.bench.efficacy_eval import Prompts, Scorer, euler_time_keys, realised_flops, undecided_share
from dydit_scale.bench.efficacy_prune import PrunePlan, plan_pruning, prune_static
from dydit_scale.bench.efficacy_score import AttributeClassifier
from dydit_scale.bench.efficacy_train import Budget, HeldOut, finetune
from dydit_scale.config import DynamicConfig
from dydit_scale.diffusion import FlowMatchingObjective
from dydit_scale.dynamic.schedule import RouterSchedule, TokenShape
from dydit_scale.infer.export import export_schedule
from dydit_scale.infer.fast import apply_schedule
from dydit_scale.models.convert import make_dynamic

__all__ = ["Setting", "dynamic_config", "rebuild", "run_arms"]


@dataclass(frozen=True)
class Setting:
    """Everything a worker needs to rebuild the bench's state (all picklable)."""

    args: argparse.Namespace
    preset: dict[str, Any]
    static_folder: str
    classifier_state: dict[str, torch.Tensor]
    prompts: Prompts
    steps: int


class _Worker:
    """The per-process state: data, held-out set, static model, scorer; `on_step` reports progress."""

    def __init__(self, setting: Setting, threads: int, on_step: Callable[[], None] | None = None):
        from diffusers import PixArtTransformer2DModel

        torch.set_num_threads(threads)
        p, args = setting.preset, setting.args
        self.setting = setting
        data = make_data(p["count"], p["heldout"], p["size"], args.seed)
        self.held = HeldOut(data, FlowMatchingObjective(), args.seed, batch=128)
        self.static = PixArtTransformer2DModel.from_pretrained(setting.static_folder).eval()
        classifier = AttributeClassifier()
        classifier.load_state_dict(setting.classifier_state)
        self.keys = euler_time_keys(p["sample_steps"])
        self.score = Scorer(self.held, classifier.eval(), self.keys.sampler, setting.prompts, p["guidance"])
        self.shape = TokenShape(image_tokens=(p["size"] // p["patch"]) ** 2, text_tokens=data.held_c.shape[1])
        self.train = dict(data=data, held=self.held, steps=setting.steps, batch=p["batch"],
                          lr=p["lr"] * args.finetune_lr_scale, seed=args.seed, on_step=on_step)

    def run(self, arm: str, lam: float | None, target: float | None) -> dict[str, Any]:
        if arm == "control":
            model, _ = finetune(copy.deepcopy(self.static), **self.train, desc="efficacy: control")
            scores, images = self.score(model, model)
            return {"row": scores | {"steps": self.setting.steps}, "images": images, "state": model.state_dict()}
        if arm == "dynamic":
            return self._dynamic(lam)
        plan = plan_pruning(self.static, target, image_tokens=self.shape.image_tokens,
                            text_tokens=self.shape.text_tokens)
        model, _ = finetune(prune_static(copy.deepcopy(self.static), plan), **self.train,
                            desc=f"efficacy: pruned λ={lam}")
        scores, images = self.score(model, model)
        row = {"lambda": lam, "arm": "pruned", "flops_ratio": plan.flops_ratio, **scores,
               "plan": plan.to_json()}
        return {"row": row, "images": images, "state": model.state_dict(), "plan": plan}

    def _dynamic(self, lam: float) -> dict[str, Any]:
        args, steps = self.setting.args, self.setting.steps
        torch.manual_seed(args.seed + round(1000 * lam))  # router init and router noise, per λ
        config = dynamic_config(args, lam)
        budget = Budget(lam, hold=round(args.hold * steps), ramp=max(1, round(args.ramp * steps)),
                        router_lr_scale=config.router_lr_scale, weight=config.flops_loss_weight)
        model, log = finetune(make_dynamic(copy.deepcopy(self.static), config), **self.train, budget=budget,
                              desc=f"efficacy: dynamic λ={lam}")
        schedule = export_schedule(model, self.keys, token_shape=self.shape,
                                   source={"bench": "efficacy", "lambda": lam})
        folder = schedule.save(Path(args.out) / f"schedule-lam{lam}")
        fast = apply_schedule(copy.deepcopy(model), schedule)
        realised = realised_flops(model, self.held, self.keys.values)
        scores, images = self.score(model, fast)
        tail = log[-max(1, steps // 20):]
        row = {"lambda": lam, "arm": "dynamic", "flops_ratio": realised["flops_ratio"], **scores,
               "schedule_flops_ratio": float(schedule.flops_ratio.mean()),
               "train_flops_ratio": sum(e["flops_ratio"] for e in tail) / len(tail),
               "token_keep_rate": realised["token_keep_rate"],
               "undecided_share": undecided_share(model, self.keys.values),
               "token_undecided_share": realised["token_undecided_share"]}
        return {"row": row, "images": images, "state": model.state_dict(), "schedule": str(folder)}


def dynamic_config(args: argparse.Namespace, lam: float) -> DynamicConfig:
    """TDW over heads and MLP groups (G = H) and SDT tokens, with the bench's router settings."""
    return DynamicConfig(target_flops_ratio=lam, heads=True, mlp_groups=None, tokens=True,
                         head_router_bias=args.head_router_bias, token_router_bias=args.token_router_bias,
                         router_lr_scale=args.router_lr_scale)


_WORKER: _Worker | None = None


def _exit_with(parent: int) -> None:
    """A worker outlives a killed bench (the pool cannot tell it): leave once `parent` is gone."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _start(setting: Setting, steps_done: Synchronized, parent: int) -> None:
    global _WORKER

    _exit_with(parent)

    def on_step() -> None:
        with steps_done.get_lock():
            steps_done.value += 1

    _WORKER = _Worker(setting, threads=1, on_step=on_step)


def _job(arm: str, lam: float | None, target: float | None) -> dict[str, Any]:
    return _WORKER.run(arm, lam, target)


def run_arms(setting: Setting, lambdas: list[float], workers: int) -> dict[tuple[str, float | None], dict]:
    """Results by (arm, λ): control, then dynamic and pruned per λ, each a dict with `row`, `images`
    and the trained `state` (plus `schedule` or `plan`)."""
    results: dict[tuple[str, float | None], dict] = {}
    if workers <= 1:
        worker = _Worker(setting, threads=setting.args.threads)
        results["control", None] = worker.run("control", None, None)
        for lam in lambdas:
            results["dynamic", lam] = worker.run("dynamic", lam, None)
            results["pruned", lam] = worker.run("pruned", lam, results["dynamic", lam]["row"]["flops_ratio"])
        return results
    context = get_context("spawn")
    steps_done = context.Value("l", 0)
    bar = tqdm(total=(1 + 2 * len(lambdas)) * setting.steps, unit="step", leave=False,
               desc=f"efficacy: fine-tune the arms ({workers} processes)")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start,
                             initargs=(setting, steps_done, os.getpid())) as pool:
        pending: dict[Future, tuple[str, float | None]] = {pool.submit(_job, "control", None, None): ("control", None)}
        pending |= {pool.submit(_job, "dynamic", lam, None): ("dynamic", lam) for lam in lambdas}
        while pending:
            done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            bar.update(steps_done.value - bar.n)
            for future in done:
                key = pending.pop(future)
                results[key] = future.result()
                bar.set_postfix_str(f"{key[0]}{'' if key[1] is None else f' λ={key[1]}'} done")
                if key[0] == "dynamic":
                    target = results[key]["row"]["flops_ratio"]
                    pending[pool.submit(_job, "pruned", key[1], target)] = ("pruned", key[1])
    bar.close()
    return results


def rebuild(static: nn.Module, setting: Setting, key: tuple[str, float | None], result: dict) -> nn.Module:
    """The trained model of one arm in this process, as inference runs it (a dynamic arm's fast path)."""
    arm, lam = key
    model = copy.deepcopy(static)
    if arm == "dynamic":
        model = make_dynamic(model, dynamic_config(setting.args, lam))
    elif arm == "pruned":
        plan: PrunePlan = result["plan"]
        model = prune_static(model, plan)
    model.load_state_dict(result["state"])
    model.eval()
    return apply_schedule(model, RouterSchedule.load(result["schedule"])) if arm == "dynamic" else model
