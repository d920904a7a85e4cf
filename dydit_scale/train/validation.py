"""Periodic validation: held-out loss (dynamic and full width) and a sample grid PNG.

Both run on every rank (ZeRO-3 parameters are gathered for sampling, so every rank must take part);
rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from dydit_scale import dist
from dydit_scale.data import build_loader
from dydit_scale.dynamic.routers import Router, full_width
from dydit_scale.infer.plots import labelled_grid, save_png

if TYPE_CHECKING:
    from dydit_scale.train.loop import Trainer

log = logging.getLogger(__name__)


class Validator:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.recipe = trainer.recipe

    def keep_rates(self) -> dict[str, float]:
        """Mean active fraction of every router's last decision, for TensorBoard (`keep/<router>`)."""
        rates = {}
        for name, module in self.trainer.engine.module.named_modules():
            if isinstance(module, Router) and module.decision is not None:
                rates[f"keep/{name}"] = float(module.decision.detach().float().mean())
        return rates

    def run(self, step: int) -> dict[str, float]:
        """Held-out losses (when `data.val_shards` is set) and the sample grid; returns the losses."""
        model = self.trainer.engine.module
        model.eval()
        try:
            losses = self._heldout_losses() if self.recipe.data.val_shards else {}
            self._sample_grid(step)
        finally:
            model.train()
        return losses

    @torch.no_grad()
    def _heldout_losses(self) -> dict[str, float]:
        trainer, recipe = self.trainer, self.recipe
        loader = build_loader(recipe.data, seed=recipe.run.seed, split="val")
        sums = {"heldout_loss": 0.0, "heldout_loss_full_width": 0.0}
        count = 0
        for index, batch in zip(range(recipe.validation.batches), loader):
            for key, context in (("heldout_loss", contextlib.nullcontext()),
                                 ("heldout_loss_full_width", full_width(trainer.engine.module))):
                torch.manual_seed(recipe.run.seed + 7919 * (index + 1) + dist.rank())
                with context:
                    sums[key] += float(trainer.eval_loss(batch))
            count += 1
        values = torch.tensor([sums["heldout_loss"], sums["heldout_loss_full_width"], float(count)], dtype=torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)
        return {"heldout_loss": float(values[0] / values[2]), "heldout_loss_full_width": float(values[1] / values[2])}

    @torch.no_grad()
    def _sample_grid(self, step: int) -> None:
        recipe, trainer = self.recipe, self.trainer
        pipe, model = trainer.components, trainer.engine.module
        params = list(model.parameters())
        gather = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        images = []
        # The frozen encoders and VAE stay fp32; a bf16 transformer then needs autocast for its inputs.
        autocast = torch.autocast(trainer.engine.device.type, dtype=trainer.dtype, enabled=trainer.dtype != torch.float32)
        with gather, autocast:
            pipe.transformer = model
            try:
                for seed, prompt in self._progress(step):
                    images.append(self._one_sample(pipe, prompt, seed))
            finally:
                pipe.transformer = None
        if dist.is_main():
            grid = labelled_grid(np.stack(images), list(recipe.validation.prompts),
                                 [f"seed {seed}" for seed in recipe.validation.seeds])
            path = save_png(grid, trainer.run_dir / "samples" / f"step-{step:07d}.png")
            trainer.metrics.image("samples", step, grid)
            log.info("sample grid %s", path)

    def _progress(self, step: int) -> tqdm:
        """(seed, prompt) pairs of the grid, row by row, under a rank-0 bar that clears when done:
        sampling the grid can take minutes, and the training bar stands still meanwhile."""
        pairs = list(itertools.product(self.recipe.validation.seeds, self.recipe.validation.prompts))
        return tqdm(pairs, desc=f"validation samples (step {step})", unit="image", leave=False,
                    disable=not dist.is_main(), dynamic_ncols=True)

    def _one_sample(self, pipe: Any, prompt: str, seed: int) -> np.ndarray:
        recipe, family = self.recipe, self.trainer.family
        kwargs: dict[str, Any] = dict(num_inference_steps=recipe.validation.inference_steps, output_type="np",
                                      guidance_scale=recipe.validation.guidance_scale,
                                      generator=torch.Generator().manual_seed(seed),
                                      height=recipe.data.resolution, width=recipe.data.resolution)
        if family.name == "flux":
            kwargs["max_sequence_length"] = recipe.data.max_text_tokens
        elif family.name == "pixart":
            kwargs.update(use_resolution_binning=False, max_sequence_length=recipe.data.max_text_tokens)
        else:
            kwargs["video_length"] = recipe.data.num_frames
        out = pipe(prompt, **kwargs)
        if family.video:
            frames = np.asarray(out.frames[0])
            return frames[len(frames) // 2]
        return np.asarray(out.images[0])
