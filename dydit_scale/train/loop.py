"""The training loop: one Trainer, no subclasses.

A step: batch → frozen encoders → noise + stratified t → dynamic model (during the complete-model
warm-up, one forward of 2B rows: the batch with routers deciding, then with every router bypassed,
so both loss terms share one forward before the backward) → diffusion loss + FLOPs loss (the DyDiT
paper's Eq. 6) → engine.backward/step → metrics → maybe checkpoint / validation.

Randomness of a micro-step (timesteps, noise, router Gumbel noise, VAE posterior sample) is seeded
from (run.seed, step, global slot), where the slot is `micro * world_size + rank`. So a resumed run
replays exactly, and a 2-rank run sees the same draws as a 1-rank run with 2 micro-steps.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from dydit_scale import dist
from dydit_scale.config import Recipe, dump_recipe
from dydit_scale.data import build_loader
from dydit_scale.data.format import Batch, batch_kind
from dydit_scale.diffusion import build_objective
from dydit_scale.dynamic.budget import flops_loss, target_ratio_at
from dydit_scale.dynamic.flops import flops_ratio
from dydit_scale.dynamic.routers import complete_rows
from dydit_scale.io import load_tensors
from dydit_scale.models.build import build_dynamic_transformer
from dydit_scale.models.encoders import load_frozen_components
from dydit_scale.models.registry import get_family
from dydit_scale.train import checkpoint
from dydit_scale.train.adapters import save_adapters
from dydit_scale.console import quiet_third_party
from dydit_scale.train.engine import EMA, announce_jit_build, build_engine
from dydit_scale.train.env import init_distributed, keep_earlier_recipe, write_env
from dydit_scale.train.failure import checkpoint_write_error
from dydit_scale.train.identity import KEY as IDENTITY
from dydit_scale.train.identity import check_resume, run_identity
from dydit_scale.train.metrics import MetricsLog, keep_rates, peak_memory
from dydit_scale.train.validation import Validator
from dydit_scale.train.watchdog import start_from_env as start_watchdog

log = logging.getLogger(__name__)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def micro_seed(seed: int, step: int, slot: int) -> int:
    """Seed of one micro-step's randomness; independent of world size and resume (see module doc)."""
    return (seed * 1_000_003 + step * 10_007 + slot) % (2**63 - 1)


class Trainer:
    """Build everything from a recipe, then `train()`; `close()` releases logs."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        # Handlers first: a preemption signal during start-up must not be lost (launchers may
        # have set it to "ignore", which the ranks inherit).
        self._stop_requested = False
        self._install_signal_handlers()
        announce_jit_build("ShareMemCommBuilder")  # DeepSpeed's CPU collectives, built on first launch
        init_distributed(recipe)
        quiet_third_party(verbose=recipe.log.verbose, main=dist.is_main())
        self._failed = False
        self.watchdog = start_watchdog(dist.rank(), dist.world_size())  # names a dead rank
        self.run_dir = Path(recipe.run.output_dir) / recipe.run.name
        self.ckpt_root = self.run_dir / "checkpoints"
        self.family = get_family(recipe.model.family)
        self.objective = build_objective(self.family.objective, timestep_weighting=recipe.train.timestep_weighting)
        # Everything that can refuse the launch runs before a file of the run is written, so a failed
        # relaunch leaves the run folder as it was.
        self.identity = run_identity(recipe, self.family.objective)
        self._resume_from = checkpoint.resolve_resume(recipe.checkpoint.resume, self.ckpt_root)
        if self._resume_from is not None:
            check_resume(checkpoint.read_marker(self._resume_from), self.identity, self._resume_from)
        dist.seed_everything(recipe.run.seed)
        # Loaded in the training dtype: DeepSpeed casts to it anyway before making its fp32 master
        # copy, and an fp32 copy on every rank would double the load's peak memory.
        self.dtype = torch.bfloat16 if recipe.model.dtype == "bf16" else torch.float32
        self.model = build_dynamic_transformer(recipe.model, recipe.dynamic, recipe.lora, dtype=self.dtype)
        if recipe.train.activation_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.loader = build_loader(recipe.data, seed=recipe.run.seed, buckets=self.family.aspect_buckets)
        self.engine, self.optimizer, self.scheduler = build_engine(self.model, recipe)
        self.device = self.engine.device
        self.components = self._frozen_components()
        self.ema = EMA(self.engine.module, recipe.train.ema_decay) if recipe.train.ema_decay > 0 else None
        self.step = 0
        self._resume()
        self._write_run_files()
        self.metrics = MetricsLog(self.run_dir, enabled=dist.is_main(), tensorboard=recipe.log.tensorboard,
                                  total_steps=recipe.train.steps, start_step=self.step,
                                  every_steps=recipe.log.every_steps)
        heldout = (functools.partial(build_loader, recipe.data, seed=recipe.run.seed, split="val",
                                     buckets=self.family.aspect_buckets)
                   if recipe.data.val_shards else None)
        self.validator = Validator(model=self.engine.module, pipe=self.components, family=self.family,
                                   recipe=recipe, run_dir=self.run_dir, metrics=self.metrics, dtype=self.dtype,
                                   device=self.device, eval_loss=self.eval_loss, heldout=heldout)

    # ----------------------------------------------------------------------------------- setup
    def _write_run_files(self) -> None:
        """recipe.yaml and env.json of this accepted launch; an earlier, different recipe is kept as
        recipe.N.yaml, and `.partial` folders of saves that never finished are removed."""
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            keep_earlier_recipe(self.run_dir, dump_recipe(self.recipe))
            write_env(self.run_dir / "env.json")
            checkpoint.remove_partials(self.ckpt_root)
        dist.barrier()

    def _frozen_components(self):
        """The pipeline's VAE and text encoders (frozen, no grad) on the engine's device; also used for
        validation samples."""
        return load_frozen_components(self.recipe.model.path, text_dtype=self.dtype, device=self.device)

    def _resume(self) -> None:
        folder = self._resume_from
        if folder is None:
            return
        exclude_frozen = self.recipe.lora.kind != "none"
        state, rank_state = checkpoint.load(self.engine, folder, strict=not exclude_frozen,
                                            universal=self.recipe.checkpoint.universal)
        self.step = int(state["step"])
        self.loader.load_state_dict(rank_state["data"])
        if self.ema is not None:
            saved = int(state["world_size"])
            if saved == dist.world_size() or self.recipe.train.zero_stage < 3:  # below ZeRO-3 each file is whole
                self.ema.load_state_dict(load_tensors(folder / f"ema-rank{dist.rank() if saved == dist.world_size() else 0}.safetensors"))
            else:
                log.warning("train.ema_decay: a ZeRO-3 EMA is sharded over %d ranks and cannot follow the "
                            "change to %d; restarting it from the loaded weights", saved, dist.world_size())
        log.info("resumed from %s at step %d", folder, self.step)

    # ------------------------------------------------------------------------------------ step
    def _latents_and_text(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[int, int]]:
        """Transformer latents, conditioning (text or class labels) and the (unpacked) latent size of
        `batch`: pre-encoded batches skip the frozen encoders, pixel and video batches go through them."""
        pipe, family = self.components, self.family
        kind = batch_kind(batch)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        cond = family.batch_conditioning(pipe, batch, max_tokens=self.recipe.data.max_text_tokens, device=self.device)
        if kind == "latent":
            raw = batch["latents"]
            return family.scale_latents(pipe.vae.config, raw), cond, tuple(raw.shape[-2:])
        pixels = batch["video"] if kind == "video" else batch["pixels"]
        latents = family.encode_pixels(pipe.vae, pixels)
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return latents, cond, (pixels.shape[-2] // factor, pixels.shape[-1] // factor)

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 latent_hw: tuple[int, int], reps: int) -> torch.Tensor:
        """The model output for `reps` stacked copies of the batch (2 during the complete-model warm-up)."""
        def stack(v: torch.Tensor) -> torch.Tensor:
            v = v.repeat(reps, *[1] * (v.dim() - 1))
            return v.to(self.dtype) if v.is_floating_point() else v

        inputs = self.family.transformer_inputs(self.engine.module, stack(x_t),
                                                self.objective.model_timestep(t).repeat(reps),
                                                {k: stack(v) for k, v in text.items()}, latent_hw=latent_hw,
                                                guidance=self.recipe.train.guidance)
        return self.engine(**inputs).sample.float()

    def _micro_step(self, batch: Batch, slot: int) -> dict[str, torch.Tensor]:
        recipe, dyn = self.recipe, self.recipe.dynamic
        torch.manual_seed(micro_seed(recipe.run.seed, self.step, slot))
        x0, text, latent_hw = self._latents_and_text(batch)
        b = x0.shape[0]
        t = self.objective.sample_timesteps(b, first_index=slot * b)
        noise = torch.randn_like(x0)
        x_t = self.objective.add_noise(x0, noise, t)
        complete = self.step < dyn.complete_warmup_steps
        reps = 2 if complete else 1
        with complete_rows(self.engine.module, torch.arange(2 * b) >= b) if complete else contextlib.nullcontext():
            out = self._predict(x_t, t, text, latent_hw, reps)
        per_sample = torch.cat([self.objective.loss(half, x0, noise, t, x_t) for half in out.split(b)])
        ratio = flops_ratio(self.engine.module)[:b]
        lam = target_ratio_at(self.step, target=dyn.target_flops_ratio, warmup_steps=dyn.target_warmup_steps,
                              hold_steps=dyn.target_hold_steps)
        parts = {"diffusion_loss": per_sample[:b].mean(), "flops_loss": flops_loss(ratio, lam, dyn.flops_loss_weight),
                 "complete_loss": per_sample[b:].mean() if complete else per_sample.new_zeros(())}
        loss = parts["diffusion_loss"] + parts["flops_loss"] + parts["complete_loss"]
        self.engine.backward(loss)
        self.engine.step()
        return {**parts, "loss": loss.detach(), "flops_ratio": ratio.detach().mean(), "lambda_eff": torch.tensor(lam)}

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> torch.Tensor:
        """Mean diffusion loss of `batch` without a backward pass (held-out validation)."""
        x0, text, latent_hw = self._latents_and_text(batch)
        t = self.objective.sample_timesteps(x0.shape[0])
        noise = torch.randn_like(x0)
        x_t = self.objective.add_noise(x0, noise, t)
        return self.objective.loss(self._predict(x_t, t, text, latent_hw, 1), x0, noise, t, x_t).mean()

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over `train.grad_accum` micro-batches; returns global-mean metrics."""
        started, sums, keys = time.perf_counter(), Counter(), []
        lr = self.scheduler.get_last_lr()[0]
        for micro in range(self.recipe.train.grad_accum):
            batch = next(batches)
            keys.extend(batch["keys"])
            parts = self._micro_step(batch, micro * dist.world_size() + dist.rank())
            for key, value in parts.items():
                sums[key] += float(value.detach()) / self.recipe.train.grad_accum
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        if self.recipe.log.sample_ledger:
            self._write_ledger(keys)
        scalars = _global_mean(dict(sums))
        scalars["lr"] = lr
        seconds = time.perf_counter() - started
        scalars["samples_per_s"] = len(keys) * dist.world_size() / seconds
        return scalars | {"step_s": seconds} | _global_max(peak_memory())

    def _write_ledger(self, keys: list[str]) -> None:
        ledger = self.run_dir / "ledger"
        ledger.mkdir(parents=True, exist_ok=True)
        with open(ledger / f"rank-{dist.rank()}.jsonl", "a") as handle:
            handle.write(json.dumps({"step": self.step, "keys": keys}) + "\n")

    # ------------------------------------------------------------------------------------ loop
    def train(self) -> None:
        """Run to `train.steps`, checkpointing every `checkpoint.every_steps`, at the end, and on
        SIGTERM/SIGUSR1 (then exit cleanly, so a requeued job resumes). A failed collective waits for
        the watchdog's verdict, so the exit names the rank that died instead of a gloo traceback."""
        try:
            self._train()
        except Exception as err:
            self._failed = True
            if self.watchdog is not None:
                self.watchdog.explain(err)
            raise

    def _train(self) -> None:
        batches = iter(_forever(self.loader))
        total = self.recipe.train.steps
        while self.step < total:
            scalars = self.train_step(batches)
            rates = keep_rates(self.engine.module)  # before validation's forwards replace the decisions
            scalars.update(self.validator.run(self.step))
            self.metrics.step(self.step, scalars, {"skipped": _global_counts(self.loader.skipped)})
            self.metrics.scalars(self.step, rates)
            stop = self._agreed_stop()
            if stop or self.step % self.recipe.checkpoint.every_steps == 0 or self.step == total:
                self.save()
            if stop:
                log.warning("stop signal received: checkpoint at step %d written, exiting", self.step)
                break
        log.info("finished at step %d; skipped samples: %s", self.step, json.dumps(_global_counts(self.loader.skipped)))

    def save(self) -> Path:
        """Checkpoint this step; a failed write (disk full, quota) is one line naming the device, and
        rank 0 removes the uncommitted folder so that the space comes back."""
        exclude_frozen = self.recipe.lora.kind != "none"
        rank_state = {"data": self.loader.state_dict()}
        tensors = {} if self.ema is None else {f"ema-rank{dist.rank()}.safetensors": self.ema.state_dict()}
        previous = checkpoint.complete_checkpoints(self.ckpt_root)
        try:
            return checkpoint.save(self.engine, self.ckpt_root, self.step,
                                   state={"target_flops_ratio": self.recipe.dynamic.target_flops_ratio,
                                          IDENTITY: self.identity},
                                   rank_state=rank_state, keep=self.recipe.checkpoint.keep,
                                   exclude_frozen=exclude_frozen, rank_tensors=tensors,
                                   before_commit=lambda partial: save_adapters(self.engine.module, self.recipe, partial))
        except Exception as err:
            partial = self.ckpt_root / f"{checkpoint.step_name(self.step)}.partial"
            translated = checkpoint_write_error(err, partial, previous[-1] if previous else None)
            if dist.is_main():
                shutil.rmtree(partial, ignore_errors=True)
            if translated is None:
                raise
            raise translated from err

    def abort(self, cause: str) -> None:
        """After a failure: tell the other ranks `cause`, stop loader workers and flush logs, without
        collectives (peers may be gone)."""
        self._failed = True
        closers = [self.loader.close, self.metrics.close]
        if self.watchdog is not None:
            self.watchdog.report_failure(cause)
            closers.append(self.watchdog.stop)
        for close in closers:
            with contextlib.suppress(Exception):  # each one runs, whatever the previous one did
                close()

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: Any) -> None:
            self._stop_requested = True

        for sig in _STOP_SIGNALS:
            signal.signal(sig, request_stop)

    def _agreed_stop(self) -> bool:
        """Did any rank receive a stop signal? (All ranks must checkpoint together.)"""
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        self.loader.close()  # its workers ignore SIGTERM: left to the interpreter's exit, they can block it
        self.metrics.close()
        if self.watchdog is not None:
            self.watchdog.stop()  # before the barrier: a rank that finished first is not a dead rank
        if torch.distributed.is_initialized():
            if not self._failed:  # after a failed collective the barrier would only fail again
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _forever(loader):
    while True:
        yield from loader


def _global_mean(values: dict[str, float]) -> dict[str, float]:
    if not torch.distributed.is_initialized():
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return {k: float(v) / dist.world_size() for k, v in zip(keys, tensor)}


def _global_max(values: dict[str, float]) -> dict[str, float]:
    """The largest value over ranks: the rank that needs the most memory is the one that fails."""
    if not torch.distributed.is_initialized():
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(keys, tensor.tolist()))


def _global_counts(counts: Counter) -> dict[str, int]:
    keys = sorted(counts)
    if not torch.distributed.is_initialized():
        return {k: int(counts[k]) for k in keys}
    tensor = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return {k: int(v) for k, v in zip(keys, tensor)}
