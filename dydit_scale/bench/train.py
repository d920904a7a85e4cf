"""Training cost of dynamic width: masked dynamic step ÷ static step, and TD-LoRA vs full fine-tuning.

Side by side in one run on the same model and inputs, as ratios (they carry across machines):
- step time (forward + backward + AdamW) of the stock diffusers transformer vs the same weights made
  dynamic (masked training path, every router live), the two taking turns step by step — goal ≤ 1.10;
- peak training memory (weights + gradients + optimizer state + activations, batch 1) and trainable
  share, TD-LoRA vs full fine-tuning — goals ≤ 0.60 and ≤ 3 %. Each memory case runs in a fresh
  subprocess (peak RSS on CPU, max allocated on CUDA) so the two peaks do not contaminate each other.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from dydit_scale.bench.goals import Goal, goal_checks
from dydit_scale.config import DynamicConfig, LoraConfig
from dydit_scale.dynamic.routers import router_parameters
from dydit_scale.lora import apply_td_lora
from dydit_scale.models.build import dynamic_blocks, timestep_embedding_dim
from dydit_scale.models.convert import make_dynamic
from dydit_scale.models.registry import get_family

#: preset -> PixArt-α transformer config (cross-attention + adaLN-single blocks, DDPM)
PRESETS: dict[str, dict] = {
    "tiny": get_family("pixart").tiny_config,
    "dit-b": dict(num_attention_heads=12, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=4,
                  cross_attention_dim=768, sample_size=32, patch_size=2, norm_num_groups=1, caption_channels=768,
                  use_additional_conditions=False, norm_type="ada_norm_single"),
}
_BATCH, _TEXT_TOKENS = 4, 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per path (after 2 warm-up steps)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--memory-child", choices=("full", "td_lora"), help=argparse.SUPPRESS)


def _model(preset: str) -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(**PRESETS[preset]).train()


def _inputs(model: torch.nn.Module) -> dict:
    config = model.config
    gen = torch.Generator().manual_seed(0)
    side = config.sample_size
    return dict(hidden_states=torch.randn(_BATCH, config.in_channels, side, side, generator=gen),
                encoder_hidden_states=torch.randn(_BATCH, _TEXT_TOKENS, config.caption_channels, generator=gen),
                timestep=torch.randint(0, 1000, (_BATCH,), generator=gen),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _train_step(model: torch.nn.Module, inputs: dict, optimizer: torch.optim.Optimizer) -> float:
    """Seconds of one forward + backward + AdamW step."""
    start = time.perf_counter()
    out = model(**inputs).sample
    out.float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def _step_seconds(models: dict[str, torch.nn.Module], inputs: dict, steps: int) -> dict[str, float]:
    """Median step time per model, the models taking turns step by step (after 2 warm-up rounds), so
    that a machine that speeds up or slows down during the run affects every model alike."""
    optimizers = {name: _adamw(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps + 2):
        for name, model in models.items():
            times[name].append(_train_step(model, inputs, optimizers[name]))
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


def _peak_memory_child(preset: str, mode: str, steps: int) -> dict:
    """One process, one configuration: peak memory of building the model and training it (weights,
    gradients, optimizer state, activations; batch 1, as large models train under ZeRO-3), and the
    trainable share. The baseline is the process before the model exists."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with _RssPeak() as rss:
        model = make_dynamic(_model(preset), DynamicConfig())
        if mode == "td_lora":
            lora = LoraConfig()
            apply_td_lora(model, targets=lora.targets, rank=lora.rank, alpha=lora.alpha, experts=lora.groups,
                          cond_dim=timestep_embedding_dim(model), block_prefixes=dynamic_blocks(model))
            for param in router_parameters(model).values():
                param.requires_grad_(True)
        inputs = {k: v[:1] if torch.is_tensor(v) else v for k, v in _inputs(model).items()}
        if cuda:
            model, inputs = model.cuda(), {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
        _step_seconds({mode: model}, inputs, steps)
    used = torch.cuda.max_memory_allocated() if cuda else rss.peak - rss.base
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"peak_bytes": used, "trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def _memory(preset: str, mode: str) -> dict:
    command = [sys.executable, "-m", "dydit_scale.bench", "train", "--preset", preset, "--steps", "2",
               "--memory-child", mode]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    if args.memory_child:
        print(json.dumps(_peak_memory_child(args.preset, args.memory_child, args.steps)))
        return 0
    static = _model(args.preset)
    dynamic = make_dynamic(copy.deepcopy(static), DynamicConfig())
    inputs = _inputs(static)
    seconds = _step_seconds({"static": static, "dynamic_masked": dynamic}, inputs, args.steps)
    full, td = _memory(args.preset, "full"), _memory(args.preset, "td_lora")
    result = {
        "preset": args.preset, "threads": torch.get_num_threads(),
        "step_s": seconds,
        "step_time_ratio": seconds["dynamic_masked"] / seconds["static"],
        "peak_memory_bytes": {"full": full["peak_bytes"], "td_lora": td["peak_bytes"]},
        "peak_memory_ratio": td["peak_bytes"] / max(1, full["peak_bytes"]),
        "trainable_share": {"full": full["trainable"] / full["total"], "td_lora": td["trainable"] / td["total"]},
        "goals": {"step_time_ratio": "<= 1.10", "peak_memory_ratio": "<= 0.60", "td_lora_trainable_share": "<= 0.03"},
    }
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
    lines = [f"dydit-bench train  preset={r['preset']}  threads={r['threads']}"]
    lines += [f"{name:<{width}}  {value:>10}  {goal}" for name, value, goal in rows]
    return "\n".join(lines)
