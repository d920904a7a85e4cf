"""`dydit-bench efficacy`: quality against FLOPs of DyDiT fine-tunes, beside a control and pruning.

Does a DyDiT fine-tune keep quality at a lower FLOPs ratio, against a matched control and static
pruning at the same FLOPs?

No FID/CLIP weights exist offline, so the bench makes its own task and judge. A stock pixel-space
`PixArtTransformer2DModel` (8 heads, rectified flow, 10 % null captions for classifier-free
guidance) is pre-trained on captioned shape images whose four attributes are known; a small
classifier trained on the real images scores samples: prompt score = share of samples with every
attribute right, FD = Fréchet distance of its features to held-out real images. Every arm starts
from that static model and is fine-tuned with the same steps, batches, optimiser and constant LR:
  control  the static model, no routers: what fine-tuning alone does to it;
  dynamic  per λ, `make_dynamic` with TDW heads + MLP groups and SDT tokens, the recipe's router
           defaults, the FLOPs loss with λ_eff held at 1 and then ramped to λ; scored on the fast
           path of its exported schedule, FLOPs as realised on held-out data (token keep rate in);
  pruned   per λ, the lowest-magnitude heads and MLP groups removed for good until the analytic
           FLOPs ratio equals the dynamic arm's realised one (the paper's comparison with pruning).
With `--cache`, the static model and each dynamic arm's fast path are also sampled and timed under
cache-dit's step caches (DBCache, TaylorSeer) at one or more thresholds (`efficacy_cache`).
Writes efficacy.json, efficacy.png (Pareto: FLOPs ratio against held-out loss, prompt score, FD),
samples.png (one labelled row per arm, one column per prompt) and each λ's schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dydit_scale.bench.efficacy_cache import cache_arms
from dydit_scale.bench.efficacy_arms import Setting, rebuild, run_arms
from dydit_scale.bench.efficacy_data import Data, make_data, redraw
from dydit_scale.bench.efficacy_eval import Prompts, Scorer, euler_time_keys, step_seconds
from dydit_scale.bench.efficacy_report import print_table, result_goals, save_pictures
from dydit_scale.bench.efficacy_score import features, frechet_distance, train_classifier
from dydit_scale.bench.efficacy_train import HeldOut, build_static, pretrain
from dydit_scale.bench.goals import goal_checks
from dydit_scale.config import DynamicConfig, StepCacheConfig
from dydit_scale.diffusion import FlowMatchingObjective
from dydit_scale.infer.step_cache import cache_problem
from dydit_scale.io import atomic_write_json

__all__ = ["PRESETS", "add_arguments", "measure", "run"]

_MODEL_KEYS = ("size", "heads", "head_dim", "layers", "patch")
#: name -> settings. `default` fits 60 minutes on 2 CPU cores from nothing; `tiny` checks the plumbing.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(size=16, heads=4, head_dim=4, layers=2, patch=4, batch=8, count=256, heldout=32, lr=2e-3,
                 pretrain_steps=30, classifier_steps=40, lambdas=[0.5], samples=8, sample_steps=4, guidance=2.0,
                 shown=4, cache_warmup=1, cache_batch=4,
                 help="16² images, 4 heads × 4, 2 blocks, 30 steps, λ = 0.5 (plumbing only, for tests)"),
    "default": dict(size=16, heads=8, head_dim=8, layers=4, patch=2, batch=32, count=10000, heldout=512, lr=2e-3,
                    pretrain_steps=4000, classifier_steps=1200, lambdas=[0.9, 0.7, 0.5, 0.3], samples=256,
                    sample_steps=20, guidance=3.0, shown=8, cache_warmup=8, cache_batch=16,
                    help="16² images, patch 2 (64 tokens), 8 heads × 8, 4 blocks, 4000 steps, "
                         "λ ∈ {0.9, 0.7, 0.5, 0.3}"),
}
_DEFAULTS = DynamicConfig()
STATIC_RECORD = "efficacy_static.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("--preset", choices=PRESETS, default="default",
                        help="; ".join(f"{k}: {v['help']}" for k, v in PRESETS.items()))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", default="runs/efficacy",
                        help="folder for efficacy.json, the PNGs and the static model")
    parser.add_argument("--static", default=None, metavar="DIR",
                        help="a static model saved by an earlier run (its diffusers folder); unset = OUT/static, "
                             "pre-trained there unless it already holds this preset's model")
    parser.add_argument("--lambdas", type=float, nargs="+", default=None, help="FLOPs budgets; unset = the preset's")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="unset = the preset's")
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="fine-tuning steps of every arm; unset = the static model's pre-training steps")
    parser.add_argument("--finetune-lr-scale", type=float, default=0.5,
                        help="constant fine-tuning LR as a fraction of the pre-training LR")
    parser.add_argument("--hold", type=float, default=0.05, help="share of fine-tuning steps at λ_eff = 1")
    parser.add_argument("--ramp", type=float, default=0.45, help="share of fine-tuning steps ramping λ_eff to λ")
    parser.add_argument("--router-lr-scale", type=float, default=_DEFAULTS.router_lr_scale,
                        help="router LR ÷ the fine-tuning LR")
    parser.add_argument("--head-router-bias", type=float, default=_DEFAULTS.head_router_bias,
                        help="initial bias of head and MLP-group routers")
    parser.add_argument("--token-router-bias", type=float, default=_DEFAULTS.token_router_bias,
                        help="initial output bias of token routers")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of the main process (pre-training, scoring, timing)")
    parser.add_argument("--workers", type=int, default=min(2, len(os.sched_getaffinity(0))),
                        help="processes that fine-tune arms side by side, one thread each; 1 = in this process")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, init, batches and noise")
    cache = parser.add_argument_group("step cache arms (cache-dit, the `cache` extra)")
    cache.add_argument("--cache", nargs="*", choices=["dbcache", "taylorseer"],
                       help="also score and time the static model and each dynamic arm under these step caches "
                            "(none named: dbcache), at each --cache-threshold")
    cache.add_argument("--cache-threshold", type=float, nargs="+", default=[0.08],
                       help="one set of cached arms per value (and cache); the first is held to the quality "
                            "goals (0.08: cache-dit's default)")
    cache.add_argument("--cache-fn", type=int, default=1, help="first blocks always computed (of the model's 4)")
    cache.add_argument("--cache-bn", type=int, default=0, help="last blocks always computed")
    cache.add_argument("--cache-warmup", type=int, help="steps never reused; unset = the preset's (default: 8, "
                                                        "cache-dit's)")


def _static_model(args: argparse.Namespace, p: dict[str, Any], data: Data,
                  held: HeldOut) -> tuple[nn.Module, dict, Path]:
    """The static model of `--static DIR`, or of OUT/static when it was trained for this very setting;
    otherwise pre-train one and save it to OUT/static (a diffusers folder + `efficacy_static.json`)."""
    from diffusers import PixArtTransformer2DModel

    steps = args.pretrain_steps or p["pretrain_steps"]
    identity = {key: p[key] for key in (*_MODEL_KEYS, "batch", "count", "lr")} | {"seed": args.seed}
    folder = Path(args.static) if args.static else Path(args.out) / "static"
    record = folder / STATIC_RECORD
    saved = json.loads(record.read_text()) if record.is_file() else None
    if args.static:
        if saved is None:
            raise SystemExit(f"efficacy: --static {folder}: no {STATIC_RECORD} there; expected a folder written "
                             "by an earlier dydit-bench efficacy run")
        wanted = {key: value for key, value in saved["identity"].items() if key != "pretrain_steps"}
        if wanted != identity:
            raise SystemExit(f"efficacy: --static {folder} was trained for {wanted}, this run needs {identity} "
                             f"(--preset {args.preset}, --seed {args.seed})")
    if saved is not None and (args.static or saved["identity"] == identity | {"pretrain_steps": steps}):
        return PixArtTransformer2DModel.from_pretrained(folder).eval(), saved["pretrain"] | {"reused": True}, folder
    model = build_static(*(p[key] for key in _MODEL_KEYS), seed=args.seed)
    info = pretrain(model, data, held, batch=p["batch"], lr=p["lr"], steps=steps,
                    eval_every=max(1, steps // 10), decay_fraction=0.2, seed=args.seed)
    model.eval().save_pretrained(folder)
    # written last and atomically: a folder without it (an interrupted save) is trained again
    atomic_write_json(record, {"identity": identity | {"pretrain_steps": steps}, "pretrain": info})
    return model, info | {"reused": False}, folder


def _caches(args: argparse.Namespace, p: dict[str, Any]) -> list[StepCacheConfig]:
    """The step caches of --cache, checked before any training (one line on a setting that cannot run)."""
    if args.cache is None:
        return []
    warmup = p["cache_warmup"] if args.cache_warmup is None else args.cache_warmup
    caches = [StepCacheConfig(mode=mode, threshold=threshold, fn=args.cache_fn, bn=args.cache_bn, warmup=warmup)
              for mode in args.cache or ["dbcache"] for threshold in args.cache_threshold]
    for cache in caches:
        problem = cache_problem("pixart", {"transformer_blocks": p["layers"]}, cache)
        if problem is not None:
            raise SystemExit(f"efficacy: --cache: {problem}")
    return caches


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Pre-train (or load) the static model, fine-tune every arm, score them; see the module doc."""
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    p = PRESETS[args.preset]
    caches = _caches(args, p)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(p["count"], p["heldout"], p["size"], args.seed)
    held = HeldOut(data, FlowMatchingObjective(), args.seed, batch=128)
    static, pre, folder = _static_model(args, p, data, held)
    classifier, classifier_info = train_classifier(data, steps=p["classifier_steps"], seed=args.seed)
    keys = euler_time_keys(p["sample_steps"])
    g = torch.Generator().manual_seed(args.seed + 13)
    pick = torch.randint(0, data.held_x.shape[0], (p["samples"],), generator=g)
    noise = torch.randn((p["samples"], 3, p["size"], p["size"]), generator=g)
    prompts = Prompts(data.held_c[pick], data.held_y[pick], noise)
    score = Scorer(held, classifier, keys.sampler, prompts, p["guidance"])
    static_scores, static_images = score(static, static)
    fd_real = frechet_distance(features(classifier, redraw(prompts.labels, p["size"], args.seed)),
                               score.real_features)
    lambdas = args.lambdas or p["lambdas"]
    setting = Setting(args, p, str(folder), classifier.state_dict(), prompts, args.finetune_steps or pre["steps"])
    results = run_arms(setting, lambdas, args.workers)
    timed = {"static": static} | {f"{arm} λ={lam}": rebuild(static, setting, (arm, lam), results[arm, lam])
                                  for arm in ("dynamic", "pruned") for lam in lambdas}
    seconds = step_seconds(timed, prompts, keys.values)
    rows = []
    for lam in lambdas:
        for arm in ("dynamic", "pruned"):
            name = f"{arm} λ={lam}"
            rows.append(results[arm, lam]["row"] | {"speedup": seconds["static"] / seconds[name],
                                                     "s_per_step": seconds[name]})
    images = {"static": static_images, "control": results["control", None]["images"]}
    images |= {f"{arm} λ={lam}": results[arm, lam]["images"] for arm in ("dynamic", "pruned") for lam in lambdas}
    result = {"classifier_accuracy": classifier_info["accuracy"], "classifier": classifier_info, "fd_real": fd_real,
              "static": static_scores | {"s_per_step": seconds["static"]},
              "control": results["control", None]["row"], "rows": rows, "preset": args.preset,
              "pretrain": pre, "finetune_steps": setting.steps,
              "sampler": {"name": "flow_euler", "steps": p["sample_steps"], "samples": p["samples"],
                          "guidance": p["guidance"]},
              "dynamic": {"router_lr_scale": args.router_lr_scale, "head_router_bias": args.head_router_bias,
                          "token_router_bias": args.token_router_bias, "hold": args.hold, "ramp": args.ramp},
              "threads": args.threads, "workers": args.workers, "out": str(out)}
    if caches:
        models = {"static": static} | {f"dynamic λ={lam}": timed[f"dynamic λ={lam}"] for lam in lambdas}
        scores = {"static": static_scores} | {f"dynamic λ={r['lambda']}": r for r in rows if r["arm"] == "dynamic"}
        result["cache"], cached_images = cache_arms(models, scores, score, caches, p["cache_batch"])
        images |= cached_images
    result["plot"], result["samples_png"] = (str(path) for path in save_pictures(result, images, prompts, p["shown"]))
    result["seconds"] = time.perf_counter() - start
    result["goal_checks"] = goal_checks(result_goals(result))
    atomic_write_json(out / "efficacy.json", result)
    return result


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0
