"""Training cost of dynamic width: masked dynamic step ÷ static step, and TD-LoRA vs full fine-tuning.

Side by side in one run on the same model and inputs, as ratios (they carry across machines):
- step time (forward + backward + AdamW) of the stock diffusers transformer vs the same weights made
  dynamic (masked training path, every router live, plus the FLOPs loss the trainer adds), the two
  taking turns step by step — goal ≤ 1.10;
- peak training memory (weights + gradients + optimizer state + activations, batch 1) and trainable
  share, TD-LoRA vs full fine-tuning — goals ≤ 0.60 and ≤ 3 %. Each memory case runs in a fresh
  subprocess (peak RSS on CPU, max allocated on CUDA) so the two peaks do not contaminate each other.

A preset names a family, a transformer config from the family records and the input size, so any
family's released width can be measured (`flux-dev`: one double + one single block of FLUX.1-dev).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dydit_scale.bench.goals import Goal, goal_checks
from dydit_scale.bench.infer_models import to_device
from dydit_scale.config import DynamicConfig, LoraConfig
from dydit_scale.diffusion import build_objective
from dydit_scale.dynamic.budget import flops_loss
from dydit_scale.dynamic.flops import flops_ratio
from dydit_scale.dynamic.routers import router_parameters
from dydit_scale.lora import apply_td_lora
from dydit_scale.models.build import dynamic_blocks, timestep_embedding_dim
from dydit_scale.models.convert import make_dynamic
from dydit_scale.models.dynamic_model import DynamicTransformerMixin
from dydit_scale.models.family import vae_scale_factor
from dydit_scale.models.registry import get_family, get_replica

__all__ = ["PRESETS", "Preset", "add_arguments", "goals", "run"]

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Preset:
    """One benchmarked transformer: its family and config, the inputs it trains on, its precision and
    the TD-LoRA adapters of the memory case."""

    family: str
    config: dict[str, Any]
    text_tokens: int
    batch: int
    steps: int
    """Default timed steps per path: enough for a stable median within a few minutes on a CPU."""
    help: str
    latent_hw: tuple[int, int] | None = None
    """Latent grid (before FLUX's 2×2 packing); None: the config's sample size (FLUX: 8×8)."""
    dtype: torch.dtype = torch.float32
    lora: LoraConfig = field(default_factory=LoraConfig)


#: TD-LoRA on FLUX as recipes/flux_tdlora_zero2.yaml trains it: FLUX's text-stream projections
#: (add_*_proj, to_add_out) and single-block MLP (proj_mlp) have names PixArt's defaults do not cover.
FLUX_LORA = LoraConfig(rank=32, alpha=32, groups=4,
                       targets=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                "to_add_out", "ff.net.0.proj", "ff.net.2", "proj_mlp"])

_DIT_B = dict(num_attention_heads=12, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=4,
              cross_attention_dim=768, sample_size=32, patch_size=2, norm_num_groups=1, caption_channels=768,
              use_additional_conditions=False, norm_type="ada_norm_single")


def _flux_dev(resolution: int = 512) -> Preset:
    """FLUX.1-dev at its released width with one double and one single block, at `resolution`² with
    the released 512 T5 tokens; bf16 weights, gradients and AdamW states as the recipe trains (fp32
    full fine-tuning of these 545 M parameters alone would take 8.7 GB)."""
    _, replica = get_replica("flux-dev")
    side = resolution // vae_scale_factor(replica.vae)
    return Preset("flux", replica.transformer_config(1), text_tokens=512, batch=1, steps=3,
                  latent_hw=(side, side), dtype=torch.bfloat16, lora=FLUX_LORA,
                  help=f"{replica.source} width, 1 double + 1 single block, {resolution}² "
                       f"({(side // 2) ** 2} image + 512 text tokens), batch 1, bf16")


PRESETS: dict[str, Preset] = {
    "tiny": Preset("pixart", get_family("pixart").tiny_config, text_tokens=16, batch=4, steps=10,
                   help="tiny PixArt-α (tests)"),
    "tiny-flux": Preset("flux", get_family("flux").tiny_config, text_tokens=16, batch=4, steps=10,
                        lora=FLUX_LORA, help="tiny FLUX (tests)"),
    "dit-b": Preset("pixart", _DIT_B, text_tokens=16, batch=4, steps=10,
                    help="PixArt-α blocks at DiT-B width (12 heads × 64), 4 blocks, 256²"),
    "flux-dev": _flux_dev(),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESETS, default="tiny",
                        help="; ".join(f"{name}: {preset.help}" for name, preset in PRESETS.items()))
    parser.add_argument("--steps", type=int,
                        help="timed steps per path (after 2 warm-up steps); default per preset (flux-dev: 3)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the steps run (CUDA timing is synchronised)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--memory-child", choices=("full", "td_lora"), help=argparse.SUPPRESS)


@contextlib.contextmanager
def _created(preset: Preset, device: torch.device) -> Iterator[None]:
    """Tensors created inside are the preset's dtype on `device`: a bf16 model built directly never
    holds an fp32 copy, whose transient would otherwise set the TD-LoRA case's peak."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(preset.dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _stock(preset: Preset) -> nn.Module:
    torch.manual_seed(0)
    return get_family(preset.family).transformer_class(**preset.config).train()


def _inputs(preset: Preset, config: Any, batch: int, device: torch.device) -> dict[str, Any]:
    """The family's example inputs with a timestep drawn as its trainer draws them (FLUX: σ ∈ [0, 1);
    DDPM: an integer step), floats in the preset's dtype as the pipelines pass them."""
    family = get_family(preset.family)
    gen = torch.Generator().manual_seed(0)
    inputs = family.example_inputs(config, batch=batch, text_tokens=preset.text_tokens, generator=gen,
                                   latent_hw=preset.latent_hw)
    objective = build_objective(family.objective)
    inputs["timestep"] = objective.model_timestep(objective.sample_timesteps(batch, generator=gen))
    return to_device(inputs, device, preset.dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model: nn.Module, inputs: dict, optimizer: torch.optim.Optimizer) -> float:
    """Seconds of one forward + backward + AdamW step; a dynamic model adds the FLOPs loss, as the
    trainer does (its backward reaches every router)."""
    device = next(model.parameters()).device
    _sync(device)
    start = time.perf_counter()
    loss = model(**inputs).sample.float().square().mean()
    if isinstance(model, DynamicTransformerMixin):
        dyn = model.dydit_config
        loss = loss + flops_loss(flops_ratio(model), dyn.target_flops_ratio, dyn.flops_loss_weight)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def _adamw(models: list[nn.Module]) -> torch.optim.Optimizer:
    """One AdamW over the trainable parameters of `models`, each once: AdamW skips a parameter without
    a gradient, so a step of one model updates exactly that model's parameters."""
    params = {id(p): p for model in models for p in model.parameters() if p.requires_grad}
    return torch.optim.AdamW(list(params.values()), lr=1e-5)


def _timed_models(preset: Preset, device: torch.device) -> dict[str, nn.Module]:
    """The stock model and the same weights made dynamic, sharing their parameter tensors: the
    permutation is function-preserving and in place, so the stock model computes the same function
    with the permuted weights, and one set of weights, gradients and AdamW states serves both (two
    would not fit in memory at a released width)."""
    with _created(preset, device):
        static = _stock(preset)
        shared = {id(p): p for p in static.parameters()}
        dynamic = make_dynamic(copy.deepcopy(static, shared), DynamicConfig())
    return {"static": static, "dynamic_masked": dynamic}


def _step_seconds(preset: Preset, steps: int, device: torch.device) -> dict[str, float]:
    """Median step time per model, the models taking turns step by step (after 2 warm-up rounds), so
    that a machine that speeds up or slows down during the run affects every model alike."""
    models = _timed_models(preset, device)
    inputs = _inputs(preset, models["static"].config, preset.batch, device)
    optimizer = _adamw(list(models.values()))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps + 2):
        for name, model in models.items():
            times[name].append(_train_step(model, inputs, optimizer))
    return {name: statistics.median(seconds[2:]) for name, seconds in times.items()}


class _RssPeak:
    """Peak resident memory while the block runs, sampled from /proc every millisecond (CPU has no
    allocator statistics; `ru_maxrss` would include start-up peaks)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.base = self._rss()
        self._done = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _poll(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "_RssPeak":
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _trainable(preset: Preset, mode: str, device: torch.device) -> nn.Module:
    """The dynamic model with the trainer's trainable set: everything (full), or the TD-LoRA
    adapters and gates plus every router (td_lora)."""
    with _created(preset, device):
        model = make_dynamic(_stock(preset), DynamicConfig())
        if mode == "td_lora":
            lora = preset.lora
            apply_td_lora(model, targets=lora.targets, rank=lora.rank, alpha=lora.alpha, experts=lora.groups,
                          cond_dim=timestep_embedding_dim(model), block_prefixes=dynamic_blocks(model))
            for param in router_parameters(model).values():
                param.requires_grad_(True)
    return model


def _peak_memory_child(preset: Preset, mode: str, device: torch.device) -> dict:
    """One process, one configuration: peak memory of building the model and training it two steps
    (weights, gradients, optimizer state, activations; batch 1, as large models train under ZeRO-3;
    the second step runs with the first one's AdamW states), and the trainable share. The baseline
    is the process before the model exists."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with _RssPeak() as rss:
        model = _trainable(preset, mode, device)
        inputs = _inputs(preset, model.config, 1, device)
        optimizer = _adamw([model])
        for _ in range(2):
            _train_step(model, inputs, optimizer)
    used = torch.cuda.max_memory_allocated(device) if cuda else rss.peak - rss.base
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"peak_bytes": used, "trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def _memory(args: argparse.Namespace, mode: str) -> dict:
    command = [sys.executable, "-m", "dydit_scale.bench", "train", "--preset", args.preset,
               "--threads", str(args.threads), "--device", args.device, "--memory-child", mode]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: cuda asked for, but torch sees no CUDA device")
    for flag in ("steps", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag}: expected an integer >= 1, got {getattr(args, flag)}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    torch.set_num_threads(args.threads)
    preset, device = PRESETS[args.preset], torch.device(args.device)
    if args.memory_child:
        print(json.dumps(_peak_memory_child(preset, args.memory_child, device)))
        return 0
    started = time.perf_counter()
    seconds = _step_seconds(preset, args.steps or preset.steps, device)
    gc.collect()  # the timed models are gone before the memory children take the machine's memory
    full, td = _memory(args, "full"), _memory(args, "td_lora")
    latent = "×".join(map(str, preset.latent_hw)) if preset.latent_hw else "sample_size"
    result = {
        "preset": args.preset, "threads": torch.get_num_threads(),
        "setup": {"family": preset.family, "dtype": DTYPES[preset.dtype], "device": args.device,
                  "batch": preset.batch, "latent": latent, "text_tokens": preset.text_tokens},
        "lora_targets": preset.lora.targets,
        "step_s": seconds,
        "step_time_ratio": seconds["dynamic_masked"] / seconds["static"],
        "peak_memory_bytes": {"full": full["peak_bytes"], "td_lora": td["peak_bytes"]},
        "peak_memory_ratio": td["peak_bytes"] / max(1, full["peak_bytes"]),
        "trainable_share": {"full": full["trainable"] / full["total"], "td_lora": td["trainable"] / td["total"]},
        "goals": {"step_time_ratio": "<= 1.10", "peak_memory_ratio": "<= 0.60", "td_lora_trainable_share": "<= 0.03"},
    }
    result["setup"]["wall_s"] = round(time.perf_counter() - started)
    result["goal_checks"] = goal_checks(goals(result))
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


def goals(r: dict) -> dict[str, Goal]:
    """The three goals of the module doc, checked against the measured `r`."""
    return {"step_time_ratio": Goal(r["step_time_ratio"], "<=", 1.10, "1.10"),
            "peak_memory_ratio": Goal(r["peak_memory_ratio"], "<=", 0.60, "0.60"),
            "td_lora_trainable_share": Goal(r["trainable_share"]["td_lora"], "<=", 0.03, "3 %")}


def _table(r: dict) -> str:
    mib = 2**20
    goal = goals(r)
    rows = [
        ("step time, static (s)", f"{r['step_s']['static']:.4f}", ""),
        ("step time, dynamic masked (s)", f"{r['step_s']['dynamic_masked']:.4f}", ""),
        ("dynamic ÷ static", f"{r['step_time_ratio']:.3f}", goal["step_time_ratio"].mark()),
        ("peak memory, full FT (MiB)", f"{r['peak_memory_bytes']['full'] / mib:.1f}", ""),
        ("peak memory, TD-LoRA (MiB)", f"{r['peak_memory_bytes']['td_lora'] / mib:.1f}", ""),
        ("TD-LoRA ÷ full", f"{r['peak_memory_ratio']:.3f}", goal["peak_memory_ratio"].mark()),
        ("trainable share, TD-LoRA", f"{100 * r['trainable_share']['td_lora']:.2f} %",
         goal["td_lora_trainable_share"].mark()),
    ]
    width = max(len(name) for name, _, _ in rows)
    setup = "".join(f"  {key}={value}" for key, value in r.get("setup", {}).items())
    lines = [f"dydit-bench train  preset={r['preset']}  threads={r['threads']}{setup}"]
    lines += [f"{name:<{width}}  {value:>10}  {goal}" for name, value, goal in rows]
    return "\n".join(lines)
