"""DySiT: the DiT architecture trained and sampled with flow matching, as DyDiT++ extends the method.

The transformer is diffusers' `DiTTransformer2DModel` with class labels, as for `dit`; the objective is
the linear interpolant x_σ = (1 − σ)·x0 + σ·ε with velocity v = ε − x0 (FLUX's), and the model reads
1000·σ as its timestep, the range of the DDPM indices a DiT checkpoint was trained on. `SiTPipeline`
samples it with the flow-matching Euler ODE solver, whose 1000·σ keys the router schedule records.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiTPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from dydit_scale.models import tiny
from dydit_scale.models.dit import NULL_CLASS, DiTFamily

__all__ = ["FAMILY", "SiTPipeline"]


class SiTPipeline(DiTPipeline):
    """`DiTPipeline` for a velocity-predicting DiT under a flow-matching scheduler.

    Adapted from diffusers 0.42.1 `DiTPipeline.__call__`: no `scale_model_input` (flow schedulers have
    none), guidance on every channel of the velocity, the scheduler's 1000·σ timesteps passed as they are.
    """

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float = 4.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, num_inference_steps: int = 50,
                 output_type: str | None = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        batch = len(class_labels)
        size, channels = self.transformer.config.sample_size, self.transformer.config.in_channels
        latents = randn_tensor((batch, channels, size, size), generator=generator, device=self._execution_device,
                               dtype=self.transformer.dtype)
        labels = torch.tensor(class_labels, device=self._execution_device).reshape(-1)
        guided = guidance_scale > 1
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            velocity = self.transformer(model_input, timestep=t.expand(model_input.shape[0]),
                                        class_labels=labels).sample[:, :channels]
            if guided:
                cond, uncond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents).prev_sample
        samples = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        samples = (samples / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                samples = self.numpy_to_pil(samples)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=samples) if return_dict else (samples,)


class SiTFamily(DiTFamily):
    """DySiT: class-conditional flow matching on the DiT architecture (velocity, no learned σ)."""

    name = "sit"
    objective = "flow"
    pipeline_class = "SiTPipeline"
    samplers = {"flow_euler": "FlowMatchEulerDiscreteScheduler"}
    time_key_definition = "sigma_x1000: 1000·σ of the flow-matching sampler (σ = 1 is pure noise)"
    tiny_config = DiTFamily.tiny_config | dict(out_channels=4)
    replicas = {}

    def pipeline_type(self) -> type:
        return SiTPipeline

    def transformer_inputs(self, transformer: torch.nn.Module, noisy: torch.Tensor, timestep: torch.Tensor,
                           text: dict[str, torch.Tensor], *, latent_hw: tuple[int, int],
                           guidance: float) -> dict[str, Any]:
        """The flow objective hands σ ∈ [0, 1]; the model reads 1000·σ, as `SiTPipeline` passes it."""
        return super().transformer_inputs(transformer, noisy, timestep * 1000, text, latent_hw=latent_hw,
                                          guidance=guidance)

    def tiny_pipeline(self, transformer: torch.nn.Module) -> Any:
        return SiTPipeline(transformer=transformer, vae=tiny.vae(4, flux=False),
                           scheduler=FlowMatchEulerDiscreteScheduler())


FAMILY = SiTFamily()
