"""Objectives: stratified timesteps, flow-matching formulas, the ADM hybrid loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dydit_scale.diffusion import DDPMObjective, FlowMatchingObjective, build_objective, stratified_uniform


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- timestep sampling

@pytest.mark.parametrize("batch", [4, 6, 8])
def test_ddpm_timesteps_cover_the_four_quarters_in_every_micro_batch(batch):
    obj = DDPMObjective()
    for step in range(50):
        t = obj.sample_timesteps(batch, generator=_gen(step))
        assert t.dtype == torch.long
        assert torch.equal(t // 250, torch.arange(batch) % 4)  # sample i in [250k, 250k+250), k = i mod 4
    assert obj.sample_timesteps(4000, generator=_gen()).unique().numel() > 900  # the bins are filled


def test_stratification_continues_over_the_global_batch():
    t = DDPMObjective().sample_timesteps(1, generator=_gen(), first_index=3)  # rank 3 of 4, 1 sample each
    assert 750 <= t.item() < 1000
    u = stratified_uniform(5, first_index=2, generator=_gen())
    assert torch.equal((u * 4).floor().long(), torch.tensor([2, 3, 0, 1, 2]))


@pytest.mark.parametrize("weighting", ["none", "cosmap"])
def test_flow_sigmas_fall_in_the_sigma_quarters(weighting):
    obj = FlowMatchingObjective(weighting=weighting)
    for step in range(50):
        sigma = obj.sample_timesteps(8, generator=_gen(step))
        assert sigma.dtype == torch.float32 and ((sigma >= 0) & (sigma < 1)).all()
        assert torch.equal((sigma * 4).floor().long(), torch.arange(8) % 4)


@pytest.mark.parametrize("weighting", ["logit_normal", "mode"])
def test_flow_density_bins_are_ordered_quartiles_with_diffusers_marginal(weighting):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    obj = FlowMatchingObjective(weighting=weighting)
    sigma = obj.sample_timesteps(40_000, generator=_gen()).reshape(-1, 4)
    for k in range(3):  # bin k holds the k-th quarter of the density, in noise order
        assert sigma[:, k].max() <= sigma[:, k + 1].min()
    # diffusers' FLUX script: σ = schedule[⌊1000·u⌋] ≈ 1 − u for u from the density
    u = compute_density_for_timestep_sampling(weighting, 40_000, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=_gen(1))
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(torch.quantile(sigma.flatten(), q), torch.quantile(1 - u, q), atol=0.01, rtol=0)


def test_logit_normal_mean_follows_diffusers_direction():
    obj = FlowMatchingObjective(weighting="logit_normal", logit_mean=1.0)
    assert obj.sample_timesteps(10_000, generator=_gen()).mean() < 0.35  # σ ≈ 1 − sigmoid(N(1, 1))


# ----------------------------------------------------------------------------- flow matching

def test_flow_noising_target_and_model_timestep_match_the_formulas():
    obj = FlowMatchingObjective()
    x0, noise = torch.randn(3, 16, 16), torch.randn(3, 16, 16)
    sigma = torch.tensor([0.0, 0.3, 0.999])
    x_t = obj.add_noise(x0, noise, sigma)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(x_t[i], (1 - s) * x0[i] + s * noise[i])
    torch.testing.assert_close(obj.target(x0, noise, sigma), noise - x0)
    torch.testing.assert_close(x_t[1] + (1.0 - 0.3) * (noise - x0)[1], noise[1])  # dx/dσ = v reaches ε at σ=1
    assert torch.equal(obj.model_timestep(sigma), sigma)  # FLUX multiplies by 1000 itself


def test_flow_loss_is_zero_for_the_true_velocity_and_weighted_mse_otherwise():
    obj = FlowMatchingObjective(weighting="cosmap")
    x0, noise, sigma = torch.randn(3, 8, 4), torch.randn(3, 8, 4), torch.tensor([0.1, 0.5, 0.9])
    x_t = obj.add_noise(x0, noise, sigma)
    assert torch.equal(obj.loss(noise - x0, x0, noise, sigma, x_t), torch.zeros(3))
    pred = torch.randn(3, 8, 4, dtype=torch.bfloat16)
    loss = obj.loss(pred, x0, noise, sigma, x_t)
    weight = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    assert loss.dtype == torch.float32 and loss.shape == (3,)
    torch.testing.assert_close(loss, weight * ((pred.float() - (noise - x0)) ** 2).mean(dim=(1, 2)))


# ----------------------------------------------------------------------------- DDPM

def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # PixArt/DiT linear schedule
    return torch.cumprod(1 - betas, 0), betas


def test_ddpm_noising_matches_the_closed_form():
    obj = DDPMObjective()
    ac, _ = _alphas_cumprod()
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999])
    x_t = obj.add_noise(x0, noise, t)
    for i, step in enumerate(t.tolist()):
        expected = ac[step].sqrt() * x0[i].double() + (1 - ac[step]).sqrt() * noise[i].double()
        torch.testing.assert_close(x_t[i].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(obj.model_timestep(t), t)


def _independent_vb(eps, v, x0, x_t, t: int) -> float:
    """KL(q(x_{t−1}|x_t,x0) ‖ p) from Ho et al. eq. 6-7 + torch.distributions, in bits/dim (float64)."""
    ac, betas = _alphas_cumprod()
    ac_prev = ac[t - 1]
    x0, x_t, eps, v = x0.double(), x_t.double(), eps.double(), v.double()
    post_mean = (ac_prev.sqrt() * betas[t] * x0 + (1 - betas[t]).sqrt() * (1 - ac_prev) * x_t) / (1 - ac[t])
    post_var = (1 - ac_prev) / (1 - ac[t]) * betas[t]
    x0_hat = (x_t - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
    model_mean = (ac_prev.sqrt() * betas[t] * x0_hat + (1 - betas[t]).sqrt() * (1 - ac_prev) * x_t) / (1 - ac[t])
    frac = (v + 1) / 2
    model_var = torch.exp(frac * betas[t].log() + (1 - frac) * post_var.log())
    kl = kl_divergence(Normal(post_mean, post_var.sqrt().expand_as(x0)), Normal(model_mean, model_var.sqrt()))
    return kl.mean().item() / math.log(2)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_vb_term_equals_an_independent_gaussian_kl(t):
    obj, g = DDPMObjective(), _gen(t)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    steps = torch.full((2,), t)
    x_t = obj.add_noise(x0, noise, steps)
    eps = noise + 0.3 * torch.randn(2, 4, 8, 8, generator=g)
    v = torch.rand(2, 4, 8, 8, generator=g) * 2 - 1
    vb = obj.vb_terms(eps, v, x0, x_t, steps)
    for i in range(2):
        expected = _independent_vb(eps[i], v[i], x0[i], x_t[i], t)
        assert vb[i].item() == pytest.approx(expected, rel=2e-3, abs=1e-6)
    assert (vb >= 0).all()


def test_decoder_nll_at_t0_equals_an_independent_computation():
    obj, g = DDPMObjective(), _gen(7)
    x0 = (torch.randint(0, 256, (2, 4, 8, 8), generator=g) / 127.5 - 1).float()  # quantised data in [−1, 1]
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # both edge bins
    noise, v = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 4, 8, 8, generator=g) * 2 - 1
    steps = torch.zeros(2, dtype=torch.long)
    x_t = obj.add_noise(x0, noise, steps)
    eps = noise + 0.1 * torch.randn(2, 4, 8, 8, generator=g)
    nll = obj.vb_terms(eps, v, x0, x_t, steps)
    ac, betas = _alphas_cumprod()
    post_var1 = (1 - ac[0]) / (1 - ac[1]) * betas[1]  # β̃_0 = 0 is replaced by β̃_1
    frac = (v.double() + 1) / 2
    std = torch.exp(0.5 * (frac * betas[0].log() + (1 - frac) * post_var1.log()))
    mean = (x_t.double() - (1 - ac[0]).sqrt() * eps.double()) / ac[0].sqrt()  # ᾱ_{−1} = 1: mean = x̂0
    dist = Normal(mean, std)
    x = x0.double()
    upper = torch.where(x > 0.999, torch.ones_like(x), dist.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), dist.cdf(x - 1 / 255))
    expected = -(upper - lower).clamp(min=1e-12).log().flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(nll.double(), expected, atol=1e-4, rtol=1e-3)
    assert (nll >= 0).all()


def test_hybrid_loss_is_zero_for_perfect_eps_and_posterior_variance():
    obj, g = DDPMObjective(), _gen(3)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([1, 260, 520, 999])
    x_t = obj.add_noise(x0, noise, t)
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # v = −1 → variance β̃_t
    torch.testing.assert_close(obj.loss(perfect, x0, noise, t, x_t), torch.zeros(4), atol=2e-4, rtol=0)
    upper_var = torch.cat([noise, torch.ones_like(noise)], dim=1)  # v = +1 → variance β_t
    t_small = torch.tensor([1, 2, 3, 5])  # β_t/β̃_t ≫ 1 only early on (β̃_t → β_t for large t)
    assert (obj.loss(upper_var, x0, noise, t_small, obj.add_noise(x0, noise, t_small)) > 1e-3).all()


def test_vb_term_trains_only_the_variance_channels():
    obj, g = DDPMObjective(), _gen(4)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 600])
    x_t = obj.add_noise(x0, noise, t)
    out = torch.cat([noise, torch.zeros_like(noise)], dim=1).requires_grad_(True)  # ε perfect: MSE grad = 0
    obj.loss(out, x0, noise, t, x_t).sum().backward()
    assert torch.equal(out.grad[:, :4], torch.zeros_like(noise))  # the VB mean uses detached ε
    assert out.grad[:, 4:].abs().sum() > 0


def test_output_channel_mismatch_is_an_error():
    obj = DDPMObjective(learned_sigma=True)
    x0 = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="8 channels"):
        obj.loss(torch.randn(2, 4, 8, 8), x0, x0, torch.tensor([1, 2]), x0)
    plain = DDPMObjective(learned_sigma=False)
    torch.testing.assert_close(plain.loss(x0, x0, x0, torch.tensor([1, 2]), x0), torch.zeros(2))


def test_latte_video_latents_work():
    obj = build_objective("ddpm")
    x0, noise = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    t = obj.sample_timesteps(2, generator=_gen())
    loss = obj.loss(torch.randn(2, 8, 3, 8, 8), x0, noise, t, obj.add_noise(x0, noise, t))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="flow matching"):
        build_objective("ddpm", timestep_weighting="cosmap")
