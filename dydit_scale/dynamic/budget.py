"""The FLOPs-constrained loss (Eq. (6) of the DyDiT paper) and its target warm-up.

L_FLOPs = w·(mean_b r_b − λ_eff)², with w = 2 (official code; the paper uses 1), computed in fp32,
and the mean taken over the *global* batch when a process group is initialised (one or two samples
per GPU under ZeRO-3 would make a per-rank mean noisy).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["flops_loss", "target_ratio_at"]


class _SumOverRanks(torch.autograd.Function):
    """all-reduce (SUM) whose backward all-reduces the upstream gradient (what the deprecated
    `torch.distributed.nn.functional.all_reduce` does, without its per-call deprecation warning)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        return grad


def _batch_mean(ratio: Tensor, global_mean: bool) -> Tensor:
    """fp32 mean of `ratio` over the local or, with a process group, the global batch.

    Σr_b and B travel in one differentiable all-reduce (SUM). Its backward sums the identical
    upstream gradients of all ranks, so each rank gets world_size × its share of ∂L/∂r_b; the
    data-parallel gradient average (DDP, DeepSpeed) then yields exactly the gradient of the global
    loss.
    """
    r = ratio.float().reshape(-1)
    stats = torch.stack([r.sum(), r.new_tensor(float(r.numel()))])
    if global_mean and torch.distributed.is_available() and torch.distributed.is_initialized():
        stats = _SumOverRanks.apply(stats)
    return stats[0] / stats[1]


def flops_loss(ratio: Tensor, target: float, weight: float = 2.0, *, global_mean: bool = True) -> Tensor:
    """FLOPs loss w·(mean_b r_b − λ_eff)² in fp32 (Eq. (6) with the code's weight 2).

    Args:
        ratio: per-sample FLOPs ratios r_b [B] from :func:`dydit_scale.dynamic.flops.flops_ratio`.
        target: λ_eff, e.g. from :func:`target_ratio_at`.
        global_mean: average over all data-parallel ranks when a process group is initialised (a
            per-rank mean of 1-2 samples is noisy); False gives the official per-GPU mean.
    """
    if ratio.dim() != 1 or ratio.numel() == 0:
        raise ValueError(f"flops_loss: ratio must have shape [B] with B > 0, got {tuple(ratio.shape)}")
    return weight * (_batch_mean(ratio, global_mean) - target) ** 2


def target_ratio_at(
    step: int, *, target: float, warmup_steps: int, hold_steps: int, ramp_after_hold: bool = False
) -> float:
    """λ_eff at optimiser step `step` (0-based); default: the official code's schedule.

    λ_eff = 1 for step < hold_steps (100 in the code); otherwise 1 − (1 − λ)·(step − s)/K while
    step − s < K = warmup_steps, then λ. In the code the ramp starts at s = 0, so at step =
    hold_steps λ_eff drops from 1 to 1 − (1 − λ)·hold_steps/K (small when hold_steps ≪ K);
    ``ramp_after_hold=True`` starts it at s = hold_steps instead (continuous, ends at hold + K).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target_ratio_at: target must be in (0, 1], got {target}")
    if warmup_steps < 0 or hold_steps < 0 or step < 0:
        raise ValueError(
            f"target_ratio_at: step, warmup_steps and hold_steps must be >= 0, "
            f"got {step}, {warmup_steps}, {hold_steps}"
        )
    if step < hold_steps:
        return 1.0
    ramp_step = step - hold_steps if ramp_after_hold else step
    if ramp_step >= warmup_steps:
        return float(target)
    return 1.0 - (1.0 - target) * ramp_step / warmup_steps
