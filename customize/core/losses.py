"""The denoising objective shared by every Stable Diffusion training method.

Ho et al. (2020), "L_simple": E_{t, x0, eps} || target - f_theta(x_t, t) ||^2 with
x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (`scheduler.add_noise`), where ab_t = alphas_cumprod[t] and the target
is eps, the velocity v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 (`scheduler.get_velocity`) or x0 itself, chosen by
`scheduler.config.prediction_type`.

Two refinements used by the DreamBooth / LoRA recipes:
- min-SNR-gamma weighting (Hang et al., 2023): w_t = min(SNR_t, gamma) / SNR_t for epsilon targets and
  min(SNR_t, gamma) / (SNR_t + 1) for velocity targets, with SNR_t = ab_t / (1 - ab_t).
- prior preservation (Ruiz et al., 2023, eq. 2): the batch is cat(instance, class) and
  L = MSE(instance) + w_prior * MSE(class); min-SNR weighting applies to the instance half only.

The functions take a diffusers-style scheduler (`alphas_cumprod`, `add_noise`, `get_velocity`, `config`) so the
same code serves diffusers' schedulers and the from-scratch ones in `customize.core`. Pure tensor math: it lives in
the core (which imports neither diffusers nor `customize.training`) so the from-scratch DDPM trains without the
engine; `customize.training.losses` re-exports it for the methods.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """eps ~ N(0, I) shaped like `latents`, plus the "noise offset" (Guttenberg, 2023): a per-sample, per-channel
    constant offset * N(0, 1) that lets the model learn to change an image's mean brightness."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)  # (B, C, h, w)
    if noise_offset:
        b, c = latents.shape[:2]
        offset = torch.randn((b, c, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset  # (B, C, h, w)
    return noise


TIMESTEP_SAMPLINGS = ("uniform", "cubic")


def sample_timesteps(scheduler, batch_size: int, device, generator: torch.Generator | None = None,
                     sampling: str = "uniform") -> torch.Tensor:
    """One t in {0, ..., T-1} per sample (T = num_train_timesteps):

      uniform   t ~ U{0, ..., T-1} (Ho et al.; the default of every recipe)
      cubic     t = floor((1 - u^3) T), u ~ U(0, 1): density 1 / (3 T (1 - t/T)^(2/3)), rising toward T, so
                P(t >= T/2) = 0.79 instead of 0.5 (T2I-Adapter, Mou et al. 2023, sec. 3.4: the structure of the
                picture is set in the early, noisy sampling steps, which an adapter of a new spatial input
                must learn first).
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()  # (B,)
    if sampling == "cubic":
        u = torch.rand((batch_size,), generator=generator, device=device)  # (B,)
        t = ((1.0 - u ** 3) * num_train_timesteps).long()
        return t.clamp_(0, num_train_timesteps - 1)  # (B,)
    raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = ab_t / (1 - ab_t), in float32 on the timesteps' device. Zero at a zero-terminal-SNR final step."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)
    ab = alphas_cumprod[timesteps]  # (B,)
    return (ab / (1.0 - ab)).float()


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network regresses, by `scheduler.config.prediction_type`: eps, v (Salimans & Ho, 2022) or x0."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min-SNR-gamma loss weights (Hang et al., 2023, eq. 11 and its v form).

    epsilon: w = min(SNR, gamma) / SNR; v_prediction: w = min(SNR, gamma) / (SNR + 1); sample (x0): w = min(SNR, gamma).
    At SNR = 0 (zero-terminal-SNR schedules) the epsilon weight takes its limit 1 instead of 0/0."""
    clipped = torch.clamp(snr_t, max=gamma)  # (B,)
    if prediction_type == "epsilon":
        return torch.where(snr_t > 0, clipped / snr_t.clamp(min=torch.finfo(snr_t.dtype).tiny), torch.ones_like(snr_t))
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every axis but the batch, computed in float32 (bf16 squares lose the small errors)."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)  # (B,)


def denoising_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    snr_t: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
    num_prior: int = 0,
    prior_loss_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Combine per-sample errors into the training loss.

    The batch is cat(instance, class) with the last `num_prior` rows from the class (prior) images.
    L = mean_i(w_i * MSE_i) over the instance rows + prior_loss_weight * mean_j(MSE_j) over the class rows
    (DreamBooth eq. 2), with w_i the min-SNR-gamma weights when `snr_gamma` is set, else 1.
    Returns {"loss"} plus, with prior preservation, the two parts {"instance_loss", "prior_loss"} for logging."""
    batch = pred.shape[0]
    if not 0 <= num_prior < batch:
        raise ValueError(f"num_prior={num_prior} must leave at least one instance row in a batch of {batch}")
    errors = per_sample_mse(pred, target)  # (B,)
    instance_errors = errors[: batch - num_prior]  # (B - P,)
    if snr_gamma:
        if snr_t is None:
            raise ValueError("min-SNR weighting needs the SNR of each sample's timestep: pass snr_t")
        instance_errors = instance_errors * min_snr_weights(snr_t[: batch - num_prior], snr_gamma, prediction_type)
    instance_loss = instance_errors.mean()
    if num_prior == 0:
        return {"loss": instance_loss}
    prior_loss = errors[batch - num_prior :].mean()
    return {
        "loss": instance_loss + prior_loss_weight * prior_loss,
        "instance_loss": instance_loss.detach(),
        "prior_loss": prior_loss.detach(),
    }


def diffusion_loss(
    scheduler,
    latents: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    num_prior: int = 0,
    prior_loss_weight: float = 1.0,
    generator: torch.Generator | None = None,
    timestep_sampling: str = "uniform",
) -> dict[str, torch.Tensor]:
    """One draw of the denoising objective: sample eps (and t, by `timestep_sampling`: `sample_timesteps`) unless
    given, form x_t with `scheduler.add_noise`,
    call `predict(x_t, t)` (the UNet with its conditioning bound), and reduce with `denoising_loss`.

    `noise` and `timesteps` are arguments so a test can fix them and check the loss by hand."""
    if noise is None:
        noise = sample_noise(latents, noise_offset, generator)
    if timesteps is None:
        timesteps = sample_timesteps(scheduler, latents.shape[0], latents.device, generator, timestep_sampling)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
    pred = predict(noisy_latents, timesteps)  # (B, C, h, w)
    target = prediction_target(scheduler, latents, noise, timesteps)  # (B, C, h, w)
    return denoising_loss(
        pred,
        target,
        snr_t=snr(scheduler, timesteps) if snr_gamma else None,
        snr_gamma=snr_gamma,
        prediction_type=scheduler.config.prediction_type,
        num_prior=num_prior,
        prior_loss_weight=prior_loss_weight,
    )
