"""DDPM training (Algorithm 1) and sampling (Algorithm 2 / DDIM) as small functions.

    loss = ddpm_loss(unet, scheduler, x0, class_labels)              # one batch of Algorithm 1
    x0 = sample(unet, scheduler, (16, 1, 8, 8), generator=g)         # Algorithm 2 with DDPMScheduler, DDIM with DDIMScheduler

Both take any denoiser called as `unet(x_t, t[, class_labels])` that returns a tensor or an object with
`.sample` (diffusers' UNet2DModel), and any scheduler with the diffusers surface (ours or diffusers'). The
objective itself is the toolkit's one denoising loss (`customize.core.losses`, which the training engine's methods
use too), so min-SNR weighting and the prediction targets are defined once for every method, and the core trains
without importing the engine or diffusers.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from customize.core.ddpm import randn_like_diffusers
from customize.core.losses import diffusion_loss

# callback(step_index, timestep, x_t after the step, x0_hat) -> None
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def denoise(unet, x_t: torch.Tensor, timesteps, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The network output for x_t at `timesteps` (a tensor whatever the network type)."""
    out = unet(x_t, timesteps, class_labels) if class_labels is not None else unet(x_t, timesteps)
    return getattr(out, "sample", out)


def ddpm_loss(unet, scheduler, x0: torch.Tensor, class_labels: torch.Tensor | None = None, *,
              noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
              snr_gamma: float | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """DDPM Algorithm 1 for one batch: t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps,
    loss = || target - f_theta(x_t, t[, y]) ||^2 averaged over the batch, where the target is eps, v or x0 by
    `scheduler.config.prediction_type`, optionally weighted by min-SNR-gamma (Hang et al. 2023).
    Returns {"loss": scalar}. `noise` / `timesteps` fix the draws (tests)."""
    return diffusion_loss(
        scheduler, x0, lambda x_t, t: denoise(unet, x_t, t, class_labels),
        noise=noise, timesteps=timesteps, snr_gamma=snr_gamma, generator=generator,
    )


def _step_kwargs(scheduler, eta: float, generator) -> dict:
    """`eta` only for schedulers whose step takes it (DDIM), `generator` for those that draw noise."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


@torch.no_grad()
def sample(unet, scheduler, shape: tuple[int, ...], *, num_inference_steps: int | None = None,
           class_labels: torch.Tensor | None = None, generator: torch.Generator | None = None, eta: float = 0.0,
           device=None, dtype: torch.dtype | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Draw x_T ~ N(0, init_noise_sigma^2 I) and run the scheduler's reverse chain to x_0 (DDPM Algorithm 2 with
    a DDPMScheduler, Song et al.'s sampler with a DDIMScheduler and `eta`).

    `num_inference_steps` defaults to all training timesteps; noise comes from `generator` exactly as
    diffusers' pipelines draw it, so the same generator gives the same samples as DDPMPipeline/DDIMPipeline.
    Returns x_0 (B, C, H, W) in the model's range (for images, [-1, 1] up to the last step's error)."""
    first = next(unet.parameters())
    device = first.device if device is None else torch.device(device)
    dtype = first.dtype if dtype is None else dtype
    scheduler.set_timesteps(num_inference_steps or scheduler.config.num_train_timesteps, device=device)
    x = randn_like_diffusers(shape, generator, device, dtype) * scheduler.init_noise_sigma  # (B, C, H, W)
    if class_labels is not None:
        class_labels = class_labels.to(device)
    kwargs = _step_kwargs(scheduler, eta, generator)
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        out = denoise(unet, model_input, t, class_labels)  # (B, C or 2C, H, W)
        x, x0_hat = scheduler.step(out, t, x, return_dict=False, **kwargs)[:2]
        if callback is not None:
            callback(i, int(t), x, x0_hat)
    return x
