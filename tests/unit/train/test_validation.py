"""`Validator` on its own: held-out loss averaging (dynamic and full width), the sample grid written by
rank 0 only, and the two cadences (`validation.every_steps`, `log.sample_every_steps`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dydit_scale import dist, make_dynamic
from dydit_scale.config import DynamicConfig, load_recipe
from dydit_scale.dynamic.routers import Router
from dydit_scale.models.registry import get_family
from dydit_scale.models.tiny import tiny_pipeline
from dydit_scale.train.metrics import keep_rates
from dydit_scale.train.validation import Validator

TINY = Path(__file__).resolve().parents[3] / "recipes" / "tiny_cpu.yaml"
#: a tiny PixArt grid: 16 px images (8² latents), 2 prompts × 2 seeds, 2 sampler steps
GRID = ["model.family=pixart", "data.resolution=16", "data.max_text_tokens=8", "validation.inference_steps=2",
        "validation.guidance_scale=1.0", "validation.batches=2", "train.steps=10", "validation.every_steps=4"]


class Images:
    """Records what the validator logs as images (stands in for MetricsLog)."""

    def __init__(self):
        self.logged: list[tuple[str, int, tuple[int, ...]]] = []

    def image(self, tag: str, step: int, image_hwc) -> None:
        self.logged.append((tag, step, tuple(image_hwc.shape)))


def _bypassed(model: torch.nn.Module) -> bool:
    return all(module.bypass for module in model.modules() if isinstance(module, Router))


def _validator(tmp_path, overrides=(), *, heldout=True, pipe=None):
    recipe = load_recipe(TINY, [*GRID, "model.path=unused", "data.shards=unused", *overrides])
    pipe = pipe or tiny_pipeline("pixart")
    model = make_dynamic(pipe.transformer, DynamicConfig())
    pipe.transformer = None  # the validator plugs the trained model in while sampling
    calls = []

    def eval_loss(batch):
        calls.append((batch["value"], _bypassed(model), model.training))
        return torch.tensor(batch["value"] + (100.0 if _bypassed(model) else 0.0))

    batches = [{"value": 1.0}, {"value": 3.0}, {"value": 50.0}]  # validation.batches=2: the third is never read
    images = Images()
    validator = Validator(model=model, pipe=pipe, family=get_family("pixart"), recipe=recipe, run_dir=tmp_path,
                          metrics=images, dtype=torch.float32, device=torch.device("cpu"), eval_loss=eval_loss,
                          heldout=(lambda: iter(batches)) if heldout else None)
    return validator, model, calls, images


def test_heldout_losses_average_the_batches_with_routers_deciding_and_bypassed(tmp_path):
    validator, model, calls, _ = _validator(tmp_path)
    losses = validator.heldout_losses()
    assert losses == {"heldout_loss": pytest.approx(2.0), "heldout_loss_full_width": pytest.approx(102.0)}
    assert [(value, bypassed) for value, bypassed, _ in calls] == [(1.0, False), (1.0, True), (3.0, False), (3.0, True)]
    assert not _bypassed(model)  # full width is undone afterwards


def test_run_puts_the_model_in_eval_mode_and_back(tmp_path, monkeypatch):
    validator, model, calls, _ = _validator(tmp_path)
    monkeypatch.setattr(validator, "sample_grid", lambda step: None)
    model.train()
    assert set(validator.run(4)) == {"heldout_loss", "heldout_loss_full_width"}
    assert calls and not any(training for _, _, training in calls)
    assert model.training


def test_rank_zero_writes_the_sample_grid_png(tmp_path):
    validator, model, _, images = _validator(tmp_path)
    path = validator.sample_grid(7)
    assert path == tmp_path / "samples" / "step-0000007.png" and path.is_file()
    picture = np.asarray(Image.open(path))
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.std() > 0
    assert images.logged and images.logged[0][:2] == ("samples", 7)
    assert validator.pipe.transformer is None  # the trained model is unplugged again
    assert keep_rates(model)  # sampling ran the dynamic model: every router decided
    assert all(0.0 <= rate <= 1.0 for rate in keep_rates(model).values())


def test_other_ranks_sample_but_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "rank", lambda: 1)  # a process group of this session may say rank 0
    validator, _, _, images = _validator(tmp_path)
    assert validator.sample_grid(7) is None
    assert not (tmp_path / "samples").exists() and not images.logged


@pytest.mark.parametrize("overrides, losses, samples", [
    # default: both on validation.every_steps (4) and at the last step (10)
    ([], [4, 8, 10], [4, 8, 10]),
    (["log.sample_every_steps=3"], [4, 8, 10], [3, 6, 9, 10]),
])
def test_losses_and_grids_each_keep_their_own_cadence(tmp_path, overrides, losses, samples):
    validator, *_ = _validator(tmp_path, overrides)
    assert [s for s in range(1, 11) if validator.losses_due(s)] == losses
    assert [s for s in range(1, 11) if validator.samples_due(s)] == samples


def test_without_heldout_shards_no_loss_is_due(tmp_path, monkeypatch):
    validator, _, calls, _ = _validator(tmp_path, heldout=False)
    monkeypatch.setattr(validator, "sample_grid", lambda step: None)
    assert not validator.losses_due(4) and validator.run(4) == {} and not calls
    with pytest.raises(ValueError, match="data.val_shards"):
        validator.heldout_losses()


def test_a_step_with_nothing_due_runs_nothing(tmp_path, monkeypatch):
    validator, model, calls, _ = _validator(tmp_path)
    monkeypatch.setattr(validator, "sample_grid", lambda step: pytest.fail("no grid is due at step 5"))
    model.train()
    assert validator.run(5) == {} and not calls and model.training
