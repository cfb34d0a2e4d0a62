"""The from-scratch schedulers against diffusers and against closed forms.

Equality with diffusers is checked step by step over 60 random configurations. Both libraries are handed the
same alphas_cumprod: ours is the float64 cumulative product rounded once to float32, diffusers' a float32
cumulative product that drifts by up to ~2e-5 relative (its zero-terminal-SNR rescale and the 0.999 cap of the
cosine schedule lose the most); `test_schedule_matches_diffusers_and_float64` pins both facts down separately.
"""

import copy
import math
import pickle
import random

import diffusers
import numpy as np
import pytest
import torch

from customize.core import DDIMScheduler, DDPMScheduler, schedules

F64 = torch.float64
DIFFUSERS_SCHEDULES = {"ddpm": ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
                       "ddim": ("linear", "scaled_linear", "squaredcos_cap_v2")}


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


def test_schedules_closed_forms():
    T = 1000
    i = np.arange(T, dtype=np.float64)
    np.testing.assert_allclose(schedules.linear(T, 1e-4, 0.02).numpy(), 1e-4 + i * (0.02 - 1e-4) / (T - 1), rtol=1e-12)
    sq = (math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / (T - 1)) ** 2
    np.testing.assert_allclose(schedules.scaled_linear(T, 0.00085, 0.012).numpy(), sq, rtol=1e-12)
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    cos = [min(1 - f[k + 1] / f[k], 0.999) for k in range(T)]
    np.testing.assert_allclose(schedules.squaredcos_cap_v2(T).numpy(), cos, rtol=1e-12)
    x = -6 + i * 12 / (T - 1)
    np.testing.assert_allclose(schedules.sigmoid(T, 1e-4, 0.02).numpy(), 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-x)), rtol=1e-12)
    quad = (math.sqrt(1e-4) + i * (math.sqrt(0.02) - math.sqrt(1e-4)) / (T - 1)) ** 2
    np.testing.assert_allclose(schedules.quadratic(T).numpy(), quad, rtol=1e-12)
    for name, fn in schedules.SCHEDULES.items():
        betas = fn(T, 1e-4, 0.02)
        assert betas.dtype == F64 and betas.shape == (T,) and bool((betas > 0).all() and (betas < 1).all()), name


def test_zero_terminal_snr_and_snr():
    betas = schedules.rescale_zero_terminal_snr(schedules.scaled_linear(1000))
    ab = schedules.alphas_cumprod(betas)
    ab_orig = schedules.alphas_cumprod(schedules.scaled_linear(1000))
    assert ab[-1] == 0.0  # zero terminal SNR
    assert torch.isclose(ab[0], ab_orig[0], rtol=1e-12)  # first step untouched
    snr = schedules.snr(ab)
    assert snr[-1] == 0 and bool((snr[1:] < snr[:-1]).all())  # strictly decreasing to 0
    t = torch.tensor([0, 10, 999])
    torch.testing.assert_close(schedules.snr(ab_orig, t), ab_orig[t] / (1 - ab_orig[t]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        schedules.make_betas("laplace")


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_schedule_matches_diffusers_and_float64(kind):
    ours_cls, ref_cls = (DDPMScheduler, diffusers.DDPMScheduler) if kind == "ddpm" else (DDIMScheduler, diffusers.DDIMScheduler)
    for name in DIFFUSERS_SCHEDULES[kind]:
        for rescale in (False, True):
            cfg = dict(beta_schedule=name, rescale_betas_zero_snr=rescale, beta_start=0.00085, beta_end=0.012)
            ours, ref = ours_cls(**cfg), ref_cls(**cfg)
            exact = schedules.alphas_cumprod(schedules.make_betas(name, 1000, 0.00085, 0.012, None, rescale))
            # ours: float64 rounded once (half an ulp of float32); diffusers: float32 arithmetic throughout
            torch.testing.assert_close(ours.alphas_cumprod.double(), exact, rtol=2**-24, atol=0)
            torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=3e-5, atol=1e-10)
            # diffusers' float32 rescale recovers betas = 1 - ab_t / ab_{t-1} with cancellation: absolute error
            torch.testing.assert_close(ours.betas, ref.betas, **(dict(rtol=3e-5, atol=5e-7) if rescale else dict(rtol=3e-6, atol=0)))


# ---------------------------------------------------------------------------------------------------------------
# Step-by-step equality with diffusers over random configurations
# ---------------------------------------------------------------------------------------------------------------


def _random_config(rng: random.Random, kind: str) -> dict:
    cfg = dict(
        num_train_timesteps=rng.choice([1000, 500, 100]),
        beta_schedule=rng.choice(DIFFUSERS_SCHEDULES[kind]),
        beta_start=rng.choice([1e-4, 0.00085]),
        beta_end=rng.choice([0.02, 0.012]),
        prediction_type=rng.choice(["epsilon", "v_prediction", "sample"]),
        timestep_spacing=rng.choice(["leading", "trailing", "linspace"]),
        steps_offset=rng.choice([0, 1]),
        clip_sample=rng.random() < 0.5,
        clip_sample_range=rng.choice([1.0, 1.5]),
        thresholding=rng.random() < 0.3,
        dynamic_thresholding_ratio=rng.choice([0.995, 0.9]),
        sample_max_value=rng.choice([1.0, 1.5]),
        rescale_betas_zero_snr=rng.random() < 0.2,
    )
    if kind == "ddpm":
        cfg["variance_type"] = rng.choice(["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"])
    else:
        cfg["set_alpha_to_one"] = rng.random() < 0.5
    return cfg


def _share_alphas(ours, ref):
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = ours.final_alpha_cumprod.clone()


def _model_output(cfg, ref, x0, eps, t, g, learned: bool):
    """A network output near the truth (the truth + 0.1 noise), in the config's parameterisation."""
    tt = t.repeat(x0.shape[0])
    target = {"epsilon": eps, "sample": x0, "v_prediction": ref.get_velocity(x0, eps, tt)}[cfg["prediction_type"]]
    out = target + 0.1 * torch.randn(x0.shape, generator=g)
    if learned:  # a second half of channels: the variance ("learned", positive) or its [-1, 1] mix weight
        extra = torch.rand(x0.shape, generator=g) * 2 - 1
        out = torch.cat([out, extra.abs() * 0.02 if cfg["variance_type"] == "learned" else extra], dim=1)
    return out


def test_steps_equal_diffusers_on_60_random_configs():
    rng = random.Random(1234)
    worst = 0.0
    kinds = ["ddpm", "ddim"] * 30
    for trial, kind in enumerate(kinds):
        cfg = _random_config(rng, kind)
        ours, ref = ((DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg)) if kind == "ddpm"
                     else (DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg)))
        _share_alphas(ours, ref)
        n_steps = rng.choice([4, 10, 25, 50])
        ours.set_timesteps(n_steps)
        ref.set_timesteps(n_steps)
        assert torch.equal(ours.timesteps, ref.timesteps), cfg
        eta = rng.choice([0.0, 0.3, 1.0])
        clipped_eps = rng.random() < 0.5
        g = torch.Generator().manual_seed(trial)
        x0 = torch.randn(2, 3, 6, 6, generator=g).clamp(-1.2, 1.2)
        learned = kind == "ddpm" and cfg["variance_type"].startswith("learned")
        for t in ours.timesteps:
            eps = torch.randn(x0.shape, generator=g)
            tt = t.repeat(2)
            a, b = ours.add_noise(x0, eps, tt), ref.add_noise(x0, eps, tt)
            worst = max(worst, (a - b).abs().max().item())
            worst = max(worst, (ours.get_velocity(x0, eps, tt) - ref.get_velocity(x0, eps, tt)).abs().max().item())
            if cfg["rescale_betas_zero_snr"] and int(t) == cfg["num_train_timesteps"] - 1 and cfg["prediction_type"] != "v_prediction":
                continue  # ab_t = 0: epsilon / sample parameterisations divide by zero in both libraries
            out = _model_output(cfg, ref, x0, eps, t, g, learned)
            seed = rng.randrange(2**31)
            if kind == "ddim":
                kw = dict(eta=eta, use_clipped_model_output=clipped_eps)
                if eta > 0 and rng.random() < 0.5:  # the noise passed in, instead of drawn from a generator
                    z = torch.randn(x0.shape, generator=g)
                    mine, theirs = ours.step(out, t, a, variance_noise=z, **kw), ref.step(out, t, a, variance_noise=z, **kw)
                else:
                    mine = ours.step(out, t, a, generator=torch.Generator().manual_seed(seed), **kw)
                    theirs = ref.step(out, t, a, generator=torch.Generator().manual_seed(seed), **kw)
            else:
                mine = ours.step(out, t, a, generator=torch.Generator().manual_seed(seed))
                theirs = ref.step(out, t, a, generator=torch.Generator().manual_seed(seed))
            for name in ("prev_sample", "pred_original_sample"):
                diff = (getattr(mine, name) - getattr(theirs, name)).abs().max().item()
                assert diff <= 1e-6, (cfg, int(t), name, diff)
                worst = max(worst, diff)
        tuple_out = ours.step(out, ours.timesteps[-1], a, return_dict=False, **({"eta": 0.0} if kind == "ddim" else {}))
        assert isinstance(tuple_out, tuple) and len(tuple_out) == 2
    assert worst <= 1e-6


def test_ddpm_custom_timesteps_equal_diffusers():
    ours, ref = DDPMScheduler(clip_sample=False), diffusers.DDPMScheduler(clip_sample=False)
    _share_alphas(ours, ref)
    custom = [999, 700, 420, 100, 37, 0]
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    assert torch.equal(ours.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 4, generator=g)
    for t in custom:
        out = torch.randn(x.shape, generator=g)
        a = ours.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        b = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert (a - b).abs().max() <= 1e-6
        x = b
    with pytest.raises(ValueError, match="descending"):
        ours.set_timesteps(timesteps=[10, 20])


def test_ddim_inversion_step_equals_diffusers_inverse_and_round_trips():
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)
    ours, ref = DDIMScheduler(**cfg), diffusers.DDIMInverseScheduler(**cfg)
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    ref.initial_alpha_cumprod = ours.final_alpha_cumprod.clone()
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    assert torch.equal(ref.timesteps, ours.timesteps.flip(0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    for t in ref.timesteps:  # ascending: image -> noise
        out = torch.randn(x.shape, generator=g)
        a = ours.inversion_step(out, t, x).prev_sample
        b = ref.step(out, t, x).prev_sample
        assert (a - b).abs().max() <= 1e-6
        x = b
    # With a model output that does not depend on x, DDIM sampling undoes inversion (float64: to 1e-10).
    x0 = torch.randn(1, 4, 8, 8, generator=g, dtype=F64)
    outs = {int(t): torch.randn(x0.shape, generator=g, dtype=F64) for t in ours.timesteps}
    x = x0
    for t in ours.timesteps.flip(0):
        x = ours.inversion_step(outs[int(t)], t, x).prev_sample
    for t in ours.timesteps:
        x = ours.step(outs[int(t)], t, x).prev_sample
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Closed-form invariants (float64)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_oracle_output_recovers_x0_and_ddim_lands_on_forward_process(spacing, prediction_type):
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing=spacing,
                          prediction_type=prediction_type, set_alpha_to_one=True, steps_offset=0)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 5, 5, generator=g, dtype=F64)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    ab = sched.alphas_cumprod.double()
    for t in sched.timesteps:
        tt = t.repeat(2)
        x_t = sched.add_noise(x0, eps, tt)
        oracle = {"epsilon": eps, "sample": x0, "v_prediction": sched.get_velocity(x0, eps, tt)}[prediction_type]
        out = sched.step(oracle, t, x_t, eta=0.0)
        torch.testing.assert_close(out.pred_original_sample, x0, rtol=0, atol=1e-9)
        prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        ab_prev = ab[prev] if prev >= 0 else torch.tensor(1.0, dtype=F64)
        expected = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps  # add_noise(x0, eps, prev)
        torch.testing.assert_close(out.prev_sample, expected, rtol=0, atol=1e-9)


def test_ddpm_posterior_equals_bayes_closed_form():
    """q(x_{t-1} | x_t, x0) from Bayes' rule: precision alpha_t / beta_t + 1 / (1 - ab_{t-1}),
    mean = var * (sqrt(alpha_t) / beta_t x_t + sqrt(ab_{t-1}) / (1 - ab_{t-1}) x0)."""
    sched = DDPMScheduler(beta_schedule="linear", clip_sample=False, prediction_type="sample")
    ab = sched.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1, 4, 4, generator=g, dtype=F64)
    x_t = torch.randn(x0.shape, generator=g, dtype=F64)
    zero = torch.zeros_like(x0)
    for t in (1, 2, 10, 500, 999):
        alpha_t = ab[t] / ab[t - 1]
        beta_t = 1 - alpha_t
        var = 1 / (alpha_t / beta_t + 1 / (1 - ab[t - 1]))
        mean = var * (alpha_t.sqrt() / beta_t * x_t + ab[t - 1].sqrt() / (1 - ab[t - 1]) * x0)
        out = sched.step(x0, t, x_t, variance_noise=zero)  # z = 0: the step returns the mean
        torch.testing.assert_close(out.prev_sample, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sched.posterior_variance(t, like=x0), var, rtol=1e-10, atol=0)
        unit = torch.ones_like(x0)  # z = 1: mean + std
        std = sched.step(x0, t, x_t, variance_noise=unit).prev_sample - mean
        torch.testing.assert_close(std, var.sqrt() * unit, rtol=1e-9, atol=1e-12)
    # t = 0 adds no noise whatever the generator
    a = sched.step(x0, 0, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
    b = sched.step(x0, 0, x_t, generator=torch.Generator().manual_seed(2)).prev_sample
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Config surface
# ---------------------------------------------------------------------------------------------------------------


def test_from_config_accepts_diffusers_configs_and_back():
    foreign = diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1).config  # FrozenDict with keys we lack
    ours, unused = DDIMScheduler.from_config(foreign, return_unused_kwargs=True)
    assert "skip_prk_steps" in unused and ours.config.steps_offset == 1
    sd_config = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1).config
    ours = DDIMScheduler.from_config(sd_config, prediction_type="v_prediction")
    assert ours.config.prediction_type == "v_prediction" and ours.config["set_alpha_to_one"] is False
    back = diffusers.DDIMScheduler.from_config(ours.config)
    for key, value in ours.config.items():
        if not key.startswith("_"):
            assert back.config[key] == value, key
    with pytest.raises(TypeError, match="frozen"):
        ours.config["steps_offset"] = 3
    with pytest.raises(TypeError, match="frozen"):
        ours.config.steps_offset = 3
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert dict(clone.config) == dict(ours.config)
        assert torch.equal(clone.alphas_cumprod, ours.alphas_cumprod)


def test_save_config_reads_back_in_both_libraries(tmp_path):
    ours = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", prediction_type="v_prediction")
    ours.save_config(tmp_path)
    again = DDPMScheduler.from_pretrained(tmp_path)
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert dict(again.config) == dict(ours.config)
    assert theirs.config.variance_type == "fixed_large" and theirs.config.prediction_type == "v_prediction"
    torch.testing.assert_close(theirs.alphas_cumprod, ours.alphas_cumprod, rtol=3e-5, atol=0)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="random")
    with pytest.raises(ValueError, match="cannot exceed"):
        DDIMScheduler(num_train_timesteps=10).set_timesteps(20)
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(torch.zeros(1, 1, 2, 2), 10, torch.zeros(1, 1, 2, 2))
    sched = DDIMScheduler()
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        sched.step(torch.zeros(1, 1, 2, 2), 901, torch.zeros(1, 1, 2, 2), eta=1.0,
                   generator=torch.Generator(), variance_noise=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="2x the sample channels"):
        DDPMScheduler(variance_type="learned_range").step(torch.zeros(1, 1, 2, 2), 5, torch.zeros(1, 1, 2, 2))
