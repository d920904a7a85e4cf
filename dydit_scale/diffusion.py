"""Training objectives: flow matching (FLUX) and DDPM ε-prediction with learned σ (PixArt-α, Latte).

No dynamic-width knowledge. Both objectives share one interface; `t` is whatever the objective
samples (σ ∈ [0, 1) for flow matching, integer steps in [0, T) for DDPM) and shapes are generic:
x0 / noise / x_t are [B, ...] (FLUX packed latents [B, N, C], PixArt [B, C, H, W], Latte
[B, C, F, H, W]), t is [B].

    t = obj.sample_timesteps(B, generator=g, device=dev)   # stratified over 4 bins
    x_t = obj.add_noise(x0, noise, t)
    out = transformer(x_t, timestep=obj.model_timestep(t), ...)
    loss = obj.loss(out, x0, noise, t, x_t)               # [B] fp32, the trainer takes the mean

**Stratification** (as the official DyDiT training code does, so that every batch covers the whole
noise range the batch-mean FLOPs loss allocates its budget over): sample i of the micro-batch
(global index `first_index + i`, so ranks with 1-2 samples can stratify over the global batch)
draws u uniformly in bin (index mod 4) of [0, 1). DDPM: t = floor(T·u), i.e. t ∈ [250k, 250k+250)
for T = 1000. Flow matching: σ = G(u) with G the quantile function of the configured density, so
the 4 bins are the density's quartiles and the marginal density is exactly the configured one; for
`none`/`cosmap` (uniform density) the bins are the σ quarters [0, .25) … [.75, 1). G is monotone,
so bin k always holds the k-th quarter of the noise range.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["DDPMObjective", "FlowMatchingObjective", "Objective", "build_objective", "stratified_uniform"]

Weighting = Literal["none", "logit_normal", "mode", "cosmap"]
TIMESTEP_BINS = 4


def stratified_uniform(batch_size: int, *, bins: int = TIMESTEP_BINS, first_index: int = 0,
                       generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """u [B] (float64) with sample i uniform in bin ((first_index + i) mod bins) of [0, 1)."""
    gen_device = generator.device if generator is not None else "cpu"
    index = torch.arange(first_index, first_index + batch_size, device=gen_device) % bins
    jitter = torch.rand(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
    return ((index + jitter) / bins).clamp(max=math.nextafter(1.0, 0.0)).to(device or gen_device)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 1, …, 1] broadcastable against `like` [B, …]."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


class FlowMatchingObjective:
    """Rectified flow as in diffusers' FLUX training (`train_dreambooth_lora_flux.py`).

    x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0, the transformer receives σ (FLUX multiplies by 1000).
    `weighting` follows diffusers: logit_normal and mode change the σ density
    (`compute_density_for_timestep_sampling`), cosmap weights the loss
    (`compute_loss_weighting_for_sd3`), none is uniform and unweighted. diffusers reads σ from a
    descending schedule at index ⌊1000·u⌋ (σ ≈ 1 − u), so e.g. logit_mean > 0 favours low noise; we
    keep that direction, but sample σ continuously in [0, 1) instead of 1000 discrete levels.
    `shift` applies the scheduler's static shift σ' = s·σ / (1 + (s − 1)·σ) (FLUX training: 1).
    """

    kind: Literal["flow"] = "flow"

    def __init__(self, *, weighting: Weighting = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, shift: float = 1.0, bins: int = TIMESTEP_BINS):
        if weighting not in ("none", "logit_normal", "mode", "cosmap"):
            raise ValueError(f"train.timestep_weighting: expected none|logit_normal|mode|cosmap, got {weighting!r}")
        if weighting == "mode" and not 0.0 <= mode_scale < 1.0 / (math.pi / 2 - 1):
            raise ValueError(f"mode_scale must be in [0, {1 / (math.pi / 2 - 1):.3f}) to keep the density map monotone")
        self.weighting, self.logit_mean, self.logit_std = weighting, logit_mean, logit_std
        self.mode_scale, self.shift, self.bins = mode_scale, shift, bins

    def sigma_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """G(u): monotone map of u ~ U[0,1) onto σ with the configured density (and shift)."""
        u = u.double()
        if self.weighting == "logit_normal":  # σ = 1 − sigmoid(N(m, s)) = sigmoid(−m + s·Φ⁻¹(u))
            sigma = torch.sigmoid(-self.logit_mean + self.logit_std * torch.special.ndtri(u))
        elif self.weighting == "mode":  # σ = 1 − f_mode(u), f_mode decreasing (SD3 paper eq. 20)
            sigma = u + self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            sigma = u
        sigma = self.shift * sigma / (1 + (self.shift - 1) * sigma)
        return sigma.clamp(0.0, 1.0).float()

    def sample_timesteps(self, batch_size: int, *, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None, first_index: int = 0) -> torch.Tensor:
        """σ [B] fp32, stratified over `bins` quantile bins of the density."""
        u = stratified_uniform(batch_size, bins=self.bins, first_index=first_index, generator=generator)
        return self.sigma_from_uniform(u).to(device or u.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = _per_sample(t.to(x0.device, torch.float32), x0)
        return ((1.0 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity v = ε − x0 (d x_t / d σ)."""
        return noise.float() - x0.float()

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """σ itself: FluxTransformer2DModel scales it by 1000 internally."""
        return t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight [B] fp32 (cosmap, else ones), diffusers' `compute_loss_weighting_for_sd3`."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting, sigmas=t.float()).float()

    def loss(self, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             x_t: torch.Tensor | None = None) -> torch.Tensor:
        """w(σ)·mean((v̂ − (ε − x0))²) per sample, [B] fp32."""
        if model_output.shape != x0.shape:
            raise ValueError(f"flow matching: model output {list(model_output.shape)} != latents {list(x0.shape)}")
        err = (model_output.float() - self.target(x0, noise, t)) ** 2
        return self.loss_weight(t.to(err.device)) * _mean_flat(err)


class DDPMObjective:
    """DDPM ε-prediction, 1000 linear-β steps (PixArt/DiT); with `learned_sigma` the ADM hybrid loss.

    Hybrid loss (ADM "learn_sigma", used by DiT/PixArt): per sample
    L = mean‖ε̂ − ε‖² + L_vb, where L_vb (bits/dim) is KL(q(x_{t−1}|x_t,x0) ‖ p(x_{t−1}|x_t)) for t > 0
    and the discretised-Gaussian decoder NLL of x0 for t = 0. p's mean uses the *detached* ε̂ (the
    VB term trains only the variance); its log-variance interpolates log β_t and log β̃_t with
    v ∈ [−1, 1] from the second half of the output channels: frac = (v + 1)/2.
    """

    kind: Literal["ddpm"] = "ddpm"

    def __init__(self, *, learned_sigma: bool = True, num_train_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02, bins: int = TIMESTEP_BINS):
        from diffusers import DDPMScheduler

        if num_train_timesteps % bins:
            raise ValueError(f"num_train_timesteps ({num_train_timesteps}) must split into {bins} bins")
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                       beta_end=beta_end, beta_schedule="linear",
                                       variance_type="learned_range" if learned_sigma else "fixed_small")
        self.learned_sigma, self.bins, self.num_train_timesteps = learned_sigma, bins, num_train_timesteps
        self._tables = self._posterior_tables(self.scheduler.betas.double())

    @staticmethod
    def _posterior_tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
        """float64 [T] tables of q(x_{t−1}|x_t, x0) (Ho et al. eq. 6-7), ᾱ_{−1} = 1."""
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        return {
            "sqrt_recip_ac": torch.rsqrt(alphas_cumprod),
            "sqrt_recipm1_ac": torch.sqrt(1.0 / alphas_cumprod - 1.0),
            "coef_x0": betas * prev.sqrt() / (1.0 - alphas_cumprod),
            "coef_xt": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            # β̃_0 = 0: use β̃_1 there, as ADM does, so the log stays finite
            "log_post_var": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "log_beta": torch.log(betas),
        }

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(self._tables[name].to(t.device)[t].float(), like)

    def sample_timesteps(self, batch_size: int, *, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None, first_index: int = 0) -> torch.Tensor:
        """Integer t [B] (long); sample i in [w·k, w·k + w) with k = (first_index + i) mod bins, w = T/bins."""
        width = self.num_train_timesteps // self.bins
        gen_device = generator.device if generator is not None else "cpu"
        index = torch.arange(first_index, first_index + batch_size, device=gen_device) % self.bins
        offset = torch.randint(0, width, (batch_size,), generator=generator, device=gen_device)
        return (index * width + offset).to(device or gen_device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε (diffusers' DDPMScheduler.add_noise)."""
        return self.scheduler.add_noise(x0, noise, t.to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise.float()

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The integer step, as PixArt/Latte pipelines pass it."""
        return t

    def loss(self, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             x_t: torch.Tensor) -> torch.Tensor:
        """ε-MSE (+ L_vb with learned σ) per sample, [B] fp32."""
        channels = x0.shape[1] * (2 if self.learned_sigma else 1)
        if model_output.shape[1] != channels or model_output.shape[2:] != x0.shape[2:]:
            expected = [x0.shape[0], channels, *x0.shape[2:]]
            raise ValueError(f"DDPM (learned_sigma={self.learned_sigma}): expected model output {expected} "
                             f"({channels} channels), got {list(model_output.shape)}")
        output = model_output.float()
        eps = output[:, : x0.shape[1]]
        mse = _mean_flat((eps - noise.float()) ** 2)
        if not self.learned_sigma:
            return mse
        return mse + self.vb_terms(eps.detach(), output[:, x0.shape[1]:], x0, x_t, t.to(x0.device))

    def vb_terms(self, eps: torch.Tensor, var_values: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """L_vb [B] in bits per dim: KL(q ‖ p) for t > 0, decoder NLL −log p(x0|x1) for t = 0."""
        x0, x_t = x0.float(), x_t.float()
        true_mean = self._at("coef_x0", t, x0) * x0 + self._at("coef_xt", t, x0) * x_t
        true_log_var = self._at("log_post_var", t, x0)
        frac = (var_values + 1.0) / 2.0
        model_log_var = frac * self._at("log_beta", t, x0) + (1.0 - frac) * true_log_var
        x0_pred = self._at("sqrt_recip_ac", t, x0) * x_t - self._at("sqrt_recipm1_ac", t, x0) * eps
        model_mean = self._at("coef_x0", t, x0) * x0_pred + self._at("coef_xt", t, x0) * x_t
        kl = _mean_flat(_normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor,
               log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)) elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                         log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) of data in [−1, 1] quantised to 256 bins under N(means, e^{2·log_scales}).

    The discretised decoder of Ho et al. 2020 (DDPM), Sec. 3.3. Edge bins extend to ±∞. Uses the
    exact normal CDF (ADM uses a tanh approximation).
    """
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + 1.0 / 255.0)
    lower = inv_std * (x - means - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    log_delta = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_delta))


Objective = FlowMatchingObjective | DDPMObjective


def build_objective(kind: Literal["flow", "ddpm"], *, timestep_weighting: Weighting = "none",
                    learned_sigma: bool = True) -> Objective:
    """The objective of a model family (`Family.objective`); weighting applies to flow matching only."""
    if kind == "flow":
        return FlowMatchingObjective(weighting=timestep_weighting)
    if kind == "ddpm":
        if timestep_weighting != "none":
            raise ValueError(f"train.timestep_weighting {timestep_weighting!r} applies to flow matching (FLUX) "
                             "only; use none for DDPM families")
        return DDPMObjective(learned_sigma=learned_sigma)
    raise ValueError(f"objective: expected flow or ddpm, got {kind!r}")
