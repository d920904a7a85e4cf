"""Periodic validation: held-out loss (dynamic and full width) and a sample grid PNG, each on its own
cadence (`validation.every_steps`; `log.sample_every_steps`, which defaults to it), and both at the
last step.

Both run on every rank (ZeRO-3 parameters are gathered for sampling, so every rank must take part);
rank 0 writes the files. The `Validator` is given what it uses, not the trainer: the model, the
frozen pipeline, the family record, an eval-loss callable and a factory of held-out batches.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dydit_scale import dist
from dydit_scale.dynamic.routers import full_width
from dydit_scale.infer.plots import labelled_grid, save_png

if TYPE_CHECKING:
    from dydit_scale.config import Recipe
    from dydit_scale.data.format import Batch
    from dydit_scale.models.family import Family
    from dydit_scale.train.metrics import MetricsLog

log = logging.getLogger(__name__)


class Validator:
    """Held-out losses and sample grids of one run.

    Args:
        model: the trained transformer (the DeepSpeed engine's module); put in eval mode while validating.
        pipe: the frozen pipeline components (VAE, text encoders, scheduler) the grid is sampled with;
            `model` is plugged in as its transformer for the duration of a grid.
        family: the model family's record (pipeline arguments, first output of a pipeline call).
        recipe: the run's recipe (`validation.*`, `log.sample_every_steps`, `data.*`, `run.seed`).
        run_dir: the run folder; grids go to `samples/step-NNNNNNN.png` in it.
        metrics: where a grid is also logged as an image (TensorBoard).
        dtype, device: the transformer's training precision and device (autocast while sampling).
        eval_loss: mean diffusion loss of one held-out batch, without a backward pass.
        heldout: a fresh iterable of held-out batches, or None when the run has no `data.val_shards`.
    """

    def __init__(self, *, model: nn.Module, pipe: Any, family: Family, recipe: Recipe, run_dir: Path,
                 metrics: MetricsLog, dtype: torch.dtype, device: torch.device,
                 eval_loss: Callable[[Batch], torch.Tensor], heldout: Callable[[], Iterable[Batch]] | None):
        self.model, self.pipe, self.family, self.recipe = model, pipe, family, recipe
        self.run_dir, self.metrics = Path(run_dir), metrics
        self.dtype, self.device = dtype, device
        self.eval_loss, self.heldout = eval_loss, heldout

    # ------------------------------------------------------------------------------- cadence
    def losses_due(self, step: int) -> bool:
        """Held-out losses every `validation.every_steps` and at the last step, when there are held-out shards."""
        every, last = self.recipe.validation.every_steps, self.recipe.train.steps
        return self.heldout is not None and (step % every == 0 or step == last)

    def samples_due(self, step: int) -> bool:
        """A sample grid every `log.sample_every_steps` (unset: `validation.every_steps`) and at the last step."""
        every = self.recipe.log.sample_every_steps or self.recipe.validation.every_steps
        return step % every == 0 or step == self.recipe.train.steps

    def run(self, step: int) -> dict[str, float]:
        """Whatever is due at `step`: held-out losses (returned) and the sample grid (written)."""
        losses_due, samples_due = self.losses_due(step), self.samples_due(step)
        if not (losses_due or samples_due):
            return {}
        self.model.eval()
        try:
            losses = self.heldout_losses() if losses_due else {}
            if samples_due:
                self.sample_grid(step)
        finally:
            self.model.train()
        return losses

    # ------------------------------------------------------------------------------- held-out loss
    @torch.no_grad()
    def heldout_losses(self) -> dict[str, float]:
        """Mean eval loss over `validation.batches` held-out batches and every rank, with the routers
        deciding (`heldout_loss`) and bypassed (`heldout_loss_full_width`)."""
        recipe = self.recipe
        if self.heldout is None:
            raise ValueError("data.val_shards: not set; held-out losses need held-out shards")
        sums = {"heldout_loss": 0.0, "heldout_loss_full_width": 0.0}
        count = 0
        for index, batch in zip(range(recipe.validation.batches), self.heldout()):
            for key, context in (("heldout_loss", contextlib.nullcontext()),
                                 ("heldout_loss_full_width", full_width(self.model))):
                # the same timesteps and noise for both widths, so that only the routers differ
                torch.manual_seed(recipe.run.seed + 7919 * (index + 1) + dist.rank())
                with context:
                    sums[key] += float(self.eval_loss(batch))
            count += 1
        values = torch.tensor([sums["heldout_loss"], sums["heldout_loss_full_width"], float(count)], dtype=torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)
        return {"heldout_loss": float(values[0] / values[2]), "heldout_loss_full_width": float(values[1] / values[2])}

    # ------------------------------------------------------------------------------- sample grid
    @torch.no_grad()
    def sample_grid(self, step: int) -> Path | None:
        """Sample every (seed, prompt) of `validation.*`; rank 0 writes the labelled grid and returns its path."""
        recipe, pipe, model = self.recipe, self.pipe, self.model
        params = list(model.parameters())
        gather = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        images = []
        # The VAE stays fp32 while the transformer may be bf16: autocast bridges the latents between them.
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with gather, autocast:
            pipe.transformer = model
            try:
                for seed, prompt in self._progress(step):
                    images.append(self._one_sample(prompt, seed))
            finally:
                pipe.transformer = None
        if not dist.is_main():
            return None
        grid = labelled_grid(np.stack(images), list(recipe.validation.prompts),
                             [f"seed {seed}" for seed in recipe.validation.seeds])
        path = save_png(grid, self.run_dir / "samples" / f"step-{step:07d}.png")
        self.metrics.image("samples", step, grid)
        log.info("sample grid %s", path)
        return path

    def _progress(self, step: int) -> tqdm:
        """(seed, prompt) pairs of the grid, row by row, under a rank-0 bar that clears when done:
        sampling the grid can take minutes, and the training bar stands still meanwhile."""
        pairs = list(itertools.product(self.recipe.validation.seeds, self.recipe.validation.prompts))
        return tqdm(pairs, desc=f"validation samples (step {step})", unit="image", leave=False,
                    disable=not dist.is_main(), dynamic_ncols=True)

    def _one_sample(self, prompt: str, seed: int) -> np.ndarray:
        """One image [H, W, 3]; of a video, its middle frame."""
        recipe = self.recipe
        kwargs = self.family.pipeline_kwargs(steps=recipe.validation.inference_steps, height=recipe.data.resolution,
                                             width=recipe.data.resolution, guidance=recipe.validation.guidance_scale,
                                             text_tokens=recipe.data.max_text_tokens, frames=recipe.data.num_frames)
        conditioning = self.family.prompt_arguments(self.pipe, prompt)
        output = self.family.first_output(self.pipe(**conditioning, generator=torch.Generator().manual_seed(seed),
                                                    **kwargs))
        return output[len(output) // 2] if self.family.video else output
