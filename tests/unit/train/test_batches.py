"""The trainer's inputs: it dispatches on the batch type the loader declares (`format.batch_kind`), and
FLUX's guidance embedding gets `train.guidance`, not the sampling guidance of the grid."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dydit_scale.config import load_recipe
from dydit_scale.data.format import DataFormatError, batch_kind
from dydit_scale.diffusion import build_objective
from dydit_scale.models.registry import get_family
from dydit_scale.models.tiny import tiny_pipeline
from dydit_scale.train.loop import Trainer

TINY = Path(__file__).resolve().parents[3] / "recipes" / "tiny_cpu.yaml"


def _batch(**media):
    return {**media, "captions": ["a red circle", "a blue square"], "keys": ["s/0", "s/1"], "meta": [{}, {}],
            "skipped": {}}


@pytest.mark.parametrize("member, kind", [("pixels", "image"), ("video", "video"), ("latents", "latent")])
def test_batch_kind_is_named_by_the_media_member(member, kind):
    assert batch_kind(_batch(**{member: torch.zeros(1)})) == kind


@pytest.mark.parametrize("media", [{}, {"pixels": torch.zeros(1), "latents": torch.zeros(1)}])
def test_a_batch_without_exactly_one_media_member_is_refused(media):
    with pytest.raises(DataFormatError, match="exactly one of pixels, video, latents"):
        batch_kind(_batch(**media))


def _flux_trainer(*overrides: str) -> Trainer:
    """A Trainer shell with only what the input path reads (no DeepSpeed, no loader)."""
    recipe = load_recipe(TINY, ["model.path=unused", "data.shards=unused", "data.max_text_tokens=8", *overrides])
    trainer = Trainer.__new__(Trainer)
    trainer.recipe, trainer.family, trainer.dtype = recipe, get_family("flux"), torch.float32
    trainer.device = torch.device("cpu")
    trainer.components = tiny_pipeline("flux")
    trainer.objective = build_objective("flow")
    return trainer


def test_image_and_pre_encoded_batches_reach_the_transformer_in_the_same_layout():
    trainer = _flux_trainer()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    latents, text, latent_hw = trainer._latents_and_text(_batch(pixels=pixels))
    assert latent_hw == (16, 16) and latents.shape == (2, 8 * 8, 16)  # packed 2×2 patches of 4 channels
    assert set(text) == {"prompt_embeds", "pooled_prompt_embeds"}
    raw = torch.randn(2, 4, 16, 16)
    pre = _batch(latents=raw, text_embeds=text["prompt_embeds"], pooled_embeds=text["pooled_prompt_embeds"])
    encoded, pre_text, pre_hw = trainer._latents_and_text(pre)
    assert pre_hw == latent_hw and encoded.shape == latents.shape
    assert torch.equal(encoded, trainer.family.scale_latents(trainer.components.vae.config, raw))
    assert torch.equal(pre_text["prompt_embeds"], text["prompt_embeds"])


@pytest.mark.parametrize("overrides, fed", [([], 3.5), (["train.guidance=1.0", "validation.guidance_scale=5.0"], 1.0)])
def test_flux_guidance_embedding_gets_train_guidance(overrides, fed):
    trainer = _flux_trainer(*overrides)
    seen = {}

    def engine(**inputs):
        seen.update(inputs)
        return SimpleNamespace(sample=torch.zeros_like(inputs["hidden_states"]))

    engine.module = SimpleNamespace(config=SimpleNamespace(guidance_embeds=True))
    trainer.engine = engine
    text = {"prompt_embeds": torch.zeros(2, 8, 32), "pooled_prompt_embeds": torch.zeros(2, 32)}
    trainer._predict(torch.zeros(2, 64, 16), torch.full((2,), 0.5), text, (16, 16), reps=2)
    assert seen["guidance"].tolist() == [fed] * 4
