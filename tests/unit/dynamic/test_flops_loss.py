"""FLOPs loss: value, gradient direction, λ warm-up, global batch mean."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from rank_processes import exit_after_success, run_ranks

from dydit_scale.dynamic.budget import flops_loss, target_ratio_at

TARGET = 0.4
#: per-rank sample offsets of the distributed test; unequal local batch sizes on purpose
RANK_OFFSETS = ([-1.0, 0.5, 2.0], [0.3])


def _straight_through_ratio(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ratio = mean of hard masks 1[σ(z) > 0.5] with the σ(z) straight-through gradient."""
    soft = torch.sigmoid(logits)
    mask = (soft > 0.5).float() + soft - soft.detach()
    return mask.mean(-1)


def test_flops_loss_value_is_weighted_squared_gap_of_batch_mean():
    ratio = torch.tensor([0.9, 0.7, 0.5, 0.9])
    assert flops_loss(ratio, 0.5).item() == pytest.approx(2.0 * (0.75 - 0.5) ** 2)
    assert flops_loss(ratio, 0.5, weight=1.0).item() == pytest.approx((0.75 - 0.5) ** 2)


def test_flops_loss_is_fp32_for_low_precision_ratios():
    ratio = torch.tensor([0.3, 0.71], dtype=torch.bfloat16, requires_grad=True)
    loss = flops_loss(ratio, 0.5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert ratio.grad is not None


@pytest.mark.parametrize(("logit", "target", "sign"), [(2.0, 0.5, 1.0), (-2.0, 0.5, -1.0)])
def test_flops_loss_pushes_router_logits_towards_the_target(logit, target, sign):
    """Ratio above λ ⇒ ∂L/∂z > 0, so a descent step lowers the keep probabilities; below ⇒ raises."""
    logits = torch.full((4, 6), logit, requires_grad=True)
    ratio = _straight_through_ratio(logits)
    assert ratio.tolist() == [float(logit > 0)] * 4  # forward uses the hard masks
    loss = flops_loss(ratio, target)
    assert loss.item() == pytest.approx(2.0 * (float(logit > 0) - target) ** 2)
    loss.backward()
    assert torch.all(torch.sign(logits.grad) == sign)
    before = torch.sigmoid(logits.detach()).mean()
    with torch.no_grad():
        logits -= 10.0 * logits.grad
    after = torch.sigmoid(logits.detach()).mean()
    assert (after - before).item() * sign < 0


def test_target_ratio_follows_the_official_warm_up():
    """λ_eff is 1 for the first 100 steps, then 1 − (1 − λ)·step/K up to K, then λ."""
    at = lambda step: target_ratio_at(step, target=0.5, warmup_steps=1000, hold_steps=100)  # noqa: E731
    assert [at(s) for s in (0, 99)] == [1.0, 1.0]
    assert [at(s) for s in (100, 500, 999)] == pytest.approx([0.95, 0.75, 0.5005])
    assert [at(s) for s in (1000, 5000)] == [0.5, 0.5]
    assert target_ratio_at(0, target=0.7, warmup_steps=0, hold_steps=0) == 0.7
    assert target_ratio_at(3, target=0.7, warmup_steps=0, hold_steps=5) == 1.0


def test_target_ratio_can_ramp_after_the_hold():
    at = lambda step: target_ratio_at(  # noqa: E731
        step, target=0.5, warmup_steps=1000, hold_steps=100, ramp_after_hold=True
    )
    assert [at(s) for s in (99, 100, 600, 1099, 1100)] == pytest.approx([1.0, 1.0, 0.75, 0.5005, 0.5])


@pytest.mark.parametrize(
    "kwargs", [dict(target=0.0), dict(target=1.5), dict(warmup_steps=-1), dict(hold_steps=-1)]
)
def test_target_ratio_rejects_bad_arguments(kwargs):
    args = dict(target=0.5, warmup_steps=10, hold_steps=1) | kwargs
    with pytest.raises(ValueError, match="target_ratio_at"):
        target_ratio_at(3, **args)


def test_flops_loss_rejects_non_batch_ratio():
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        flops_loss(torch.tensor(0.5), 0.5)


# --------------------------------------------------------------------------- 2 ranks vs 1 rank


def _shared_logits() -> torch.Tensor:
    """Router logits, identical on every rank (a replicated data-parallel parameter)."""
    return torch.linspace(-1.5, 2.0, 5).requires_grad_()


def _ratios(logits: torch.Tensor, offsets: list[float]) -> torch.Tensor:
    """Per-sample soft ratios σ(z + offset_b) averaged over units; one sample per offset."""
    return torch.sigmoid(logits + torch.tensor(offsets)[:, None]).mean(-1)


def _global_mean_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        logits = _shared_logits()
        ratio = _ratios(logits, RANK_OFFSETS[rank])
        loss = flops_loss(ratio, TARGET)
        loss.backward()
        grad = logits.grad.clone()
        dist.all_reduce(grad)  # the data-parallel gradient average (DDP, DeepSpeed)
        local = flops_loss(ratio.detach(), TARGET, global_mean=False)
        torch.save({"loss": loss.detach(), "grad": grad / world, "local": local}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_after_success()


@pytest.mark.distributed
def test_global_mean_over_two_ranks_equals_one_rank_on_the_global_batch(tmp_path):
    run_ranks(_global_mean_worker, (2, str(tmp_path / "store"), str(tmp_path)))
    logits = _shared_logits()
    reference = flops_loss(_ratios(logits, RANK_OFFSETS[0] + RANK_OFFSETS[1]), TARGET)
    reference.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(result["loss"], reference.detach(), msg=f"rank {rank} loss")
        torch.testing.assert_close(result["grad"], logits.grad, msg=f"rank {rank} gradient")
        assert abs(result["local"].item() - reference.item()) > 1e-3, f"rank {rank}: test not discriminating"
