"""The denoising objective: targets by prediction type, min-SNR-gamma weights, noise offset, prior preservation."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from customize.training.losses import (
    denoising_loss,
    diffusion_loss,
    min_snr_weights,
    prediction_target,
    sample_noise,
    sample_timesteps,
    snr,
)


def _scheduler(prediction_type="epsilon", **kw):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type, **kw)


def _ab(sched, t):
    return sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)


def test_targets_by_prediction_type_match_closed_forms():
    x0, eps = torch.randn(2, 3, 4, 4, 4).double().unbind(0)
    t = torch.tensor([0, 311, 998])
    for kind in ("epsilon", "v_prediction", "sample"):
        sched = _scheduler(kind)
        got = prediction_target(sched, x0, eps, t)
        ab = _ab(sched, t)
        want = {"epsilon": eps, "sample": x0, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[kind]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(sched, x0, eps, t)


def test_snr_matches_diffusers_and_min_snr_weights_follow_the_paper():
    sched = _scheduler()
    t = torch.arange(0, 1000, 37)
    s = snr(sched, t)
    torch.testing.assert_close(s, compute_snr(sched, t), rtol=1e-5, atol=0)
    gamma = 5.0
    torch.testing.assert_close(min_snr_weights(s, gamma, "epsilon"), torch.minimum(s, torch.tensor(gamma)) / s)
    torch.testing.assert_close(min_snr_weights(s, gamma, "v_prediction"), torch.minimum(s, torch.tensor(gamma)) / (s + 1))
    # low-noise steps (SNR > gamma) are down-weighted, high-noise steps keep weight 1 (epsilon)
    w = min_snr_weights(s, gamma, "epsilon")
    assert (w[s > gamma] < 1).all() and torch.equal(w[s <= gamma], torch.ones_like(w[s <= gamma]))


def test_min_snr_weight_is_finite_at_zero_terminal_snr():
    sched = _scheduler("epsilon", rescale_betas_zero_snr=True)
    s = snr(sched, torch.tensor([999, 500]))
    assert s[0] == 0
    w = min_snr_weights(s, 5.0, "epsilon")
    assert torch.isfinite(w).all() and w[0] == 1


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    plain = sample_noise(latents, 0.0, torch.Generator().manual_seed(3))
    offset = sample_noise(latents, 0.1, torch.Generator().manual_seed(3))
    delta = offset - plain  # (B, C, h, w): the offset term alone
    assert delta.abs().amax() > 0
    torch.testing.assert_close(delta, delta[:, :, :1, :1].expand_as(delta))


def test_timesteps_cover_the_training_range():
    t = sample_timesteps(_scheduler(), 4096, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999 and t.unique().numel() > 900


def test_cubic_timesteps_favour_the_noisy_end_with_the_stated_density():
    """t = floor((1 - u^3) T): P(t >= T/2) = 0.5^(1/3) ~ 0.794 (uniform: 0.5), P(t < T/10) = 1 - 0.9^(1/3)
    ~ 0.0345, every t in range; uniform sampling is the plain randint (unchanged draws)."""
    sched = _scheduler()
    t = sample_timesteps(sched, 20000, "cpu", torch.Generator().manual_seed(0), sampling="cubic")
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert abs((t >= 500).float().mean().item() - 0.5 ** (1 / 3)) < 0.015
    assert abs((t < 100).float().mean().item() - (1 - 0.9 ** (1 / 3))) < 0.006
    torch.testing.assert_close(sample_timesteps(sched, 64, "cpu", torch.Generator().manual_seed(1)),
                               torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="cubic"):
        sample_timesteps(sched, 4, "cpu", sampling="logit")


def test_diffusion_loss_draws_its_timesteps_by_the_sampling_asked():
    sched = _scheduler("v_prediction")
    latents = torch.randn(8, 4, 4, 4)
    seen = []

    def predict(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)

    diffusion_loss(sched, latents, predict, generator=torch.Generator().manual_seed(5), timestep_sampling="cubic")
    g = torch.Generator().manual_seed(5)
    sample_noise(latents, 0.0, g)  # the loss draws the noise first, then t
    torch.testing.assert_close(seen[0], sample_timesteps(sched, 8, "cpu", g, sampling="cubic"))


def test_prior_weight_zero_equals_the_no_prior_loss():
    pred, target = torch.randn(2, 6, 4, 8, 8).unbind(0)
    s = torch.rand(6) * 10
    for gamma in (None, 5.0):
        with_prior = denoising_loss(pred, target, snr_t=s, snr_gamma=gamma, num_prior=2, prior_loss_weight=0.0)
        without = denoising_loss(pred[:4], target[:4], snr_t=s[:4], snr_gamma=gamma)
        torch.testing.assert_close(with_prior["loss"], without["loss"], rtol=0, atol=0)
        assert with_prior["prior_loss"] > 0


def test_loss_equals_the_hand_computed_mix_for_fixed_noise():
    """L = mean_inst(w * MSE) + w_prior * mean_class(MSE) with x_t from the closed form, min-SNR on instances only."""
    sched = _scheduler("v_prediction")
    x0, eps = torch.randn(2, 4, 4, 8, 8).double().unbind(0)
    t = torch.tensor([10, 400, 700, 990])
    weight = torch.randn(4, 4, dtype=torch.float64)

    def predict(x_t, timesteps):  # a fixed linear "network" of x_t
        return torch.einsum("oc,bchw->bohw", weight, x_t)

    out = diffusion_loss(sched, x0, predict, noise=eps, timesteps=t, snr_gamma=5.0, num_prior=2, prior_loss_weight=0.7)

    ab = _ab(sched, t)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    mse = ((predict(x_t, t) - v) ** 2).mean(dim=(1, 2, 3))  # (B,)
    s = (ab / (1 - ab)).flatten()
    w = torch.clamp(s, max=5.0) / (s + 1)
    want = (w[:2] * mse[:2]).mean() + 0.7 * mse[2:].mean()
    torch.testing.assert_close(out["loss"].double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["prior_loss"].double(), mse[2:].mean(), rtol=1e-5, atol=0)


def test_min_snr_leaves_the_prior_half_unweighted():
    pred, target = torch.randn(2, 4, 4, 8, 8).unbind(0)
    s = torch.tensor([0.01, 50.0, 0.01, 50.0])
    a = denoising_loss(pred, target, snr_t=s, snr_gamma=1.0, num_prior=2)
    b = denoising_loss(pred, target, snr_t=s, snr_gamma=None, num_prior=2)
    torch.testing.assert_close(a["prior_loss"], b["prior_loss"], rtol=0, atol=0)
    assert not torch.equal(a["instance_loss"], b["instance_loss"])


def test_bad_prior_split_is_refused():
    pred = torch.randn(2, 4, 2, 2)
    with pytest.raises(ValueError, match="instance row"):
        denoising_loss(pred, pred, num_prior=2)
    with pytest.raises(ValueError, match="snr_t"):
        denoising_loss(pred, pred, snr_gamma=5.0)
