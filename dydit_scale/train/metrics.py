"""Run logging: one `metrics.jsonl` line per optimizer step, TensorBoard, and a tqdm bar on rank 0;
and `keep_rates`, the per-router scalars the trainer logs beside them.

While the bar is open, log lines and warnings print through `tqdm.write`, above the bar.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from dydit_scale.console import bar_safe_logging

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


def keep_rates(model: nn.Module) -> dict[str, float]:
    """Mean active fraction of every router's last decision, for TensorBoard (`keep/<router>`);
    a router without a decision yet is left out."""
    from dydit_scale.dynamic.routers import Router

    rates = {}
    for name, module in model.named_modules():
        if isinstance(module, Router) and module.decision is not None:
            rates[f"keep/{name}"] = float(module.decision.detach().float().mean())
    return rates


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far, in GB: `max_rss_gb` (the kernel's resident-set high-water
    mark VmHWM, so a short spike between two steps still shows; unlike `ru_maxrss` it does not carry
    a forking parent's peak over `exec`) and, when CUDA is in use, `max_cuda_gb` (the caching
    allocator's peak of allocated tensors since the start)."""
    import torch

    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    peaks = {"max_rss_gb": kib * 1024 / 1e9}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["max_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return peaks


class MetricsLog:
    """Rank-0 sink for step metrics; on other ranks every method is a no-op."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, total_steps: int,
                 start_step: int, every_steps: int):
        self.enabled = enabled
        self.every_steps = every_steps
        self._jsonl = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
        self._console = contextlib.ExitStack()
        self._console.enter_context(bar_safe_logging())
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         disable=not enabled, dynamic_ncols=True)

    def step(self, step: int, scalars: dict[str, float], extra: dict[str, Any] | None = None) -> None:
        """Record one optimizer step: JSONL (all keys), TensorBoard (scalars), bar postfix."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _finite(v) for k, v in scalars.items()}, **(extra or {})}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}",
                              flops=f"{scalars.get('flops_ratio', float('nan')):.3f}")
        if step % self.every_steps == 0:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Extra TensorBoard scalars (per-block keep rates, held-out losses) without a JSONL line."""
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)

    def image(self, tag: str, step: int, image_hwc) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        self._console.close()
        if not self.enabled:
            return
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
