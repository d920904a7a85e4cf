"""Checkpoints commit by rename, a half-written folder is never resumed from, and resume is exact."""

from __future__ import annotations

import pytest
import torch

from dydit_scale.train import checkpoint


def _engine(deepspeed, stage: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _step(engine, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 1, generator=gen)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.parametrize("stage", [2, 3])
def test_save_rename_load_reproduces_the_next_loss(deepspeed_world1, tmp_path, stage):
    engine = _engine(deepspeed_world1, stage)
    for i in range(3):
        _step(engine, i)
    folder = checkpoint.save(engine, tmp_path, 3, state={"note": "x"}, rank_state={"data": {"seen": 12}},
                             keep=2, exclude_frozen=False)
    torch.manual_seed(123)
    expected = [_step(engine, 3), torch.rand(1).item()]

    fresh = _engine(deepspeed_world1, stage)
    state, rank_state = checkpoint.load(fresh, folder, strict=True)
    assert state["step"] == 3 and rank_state == {"data": {"seen": 12}}
    torch.manual_seed(123)
    assert [_step(fresh, 3), torch.rand(1).item()] == pytest.approx(expected, abs=1e-7)
    assert (tmp_path / "latest").read_text().strip() == "step-0000003"


def test_partial_folder_is_ignored_and_old_checkpoints_are_pruned(deepspeed_world1, tmp_path):
    engine = _engine(deepspeed_world1, 2)
    for step in (1, 2, 3):
        _step(engine, step)
        checkpoint.save(engine, tmp_path, step, state={}, rank_state={}, keep=2, exclude_frozen=False)
    (tmp_path / "step-0000004.partial").mkdir()
    (tmp_path / "step-0000005").mkdir()  # no marker: an interrupted commit
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    assert checkpoint.resolve_resume("auto", tmp_path).name == "step-0000003"
    assert checkpoint.resolve_resume("never", tmp_path) is None


def test_resume_path_that_is_not_a_checkpoint_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.resume: .* is not a complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "step-0000007"), tmp_path)
