"""The from-scratch diffusion core: beta schedules, DDPM / DDIM schedulers with the diffusers surface, a UNet
that loads diffusers' UNet2DModel weights, the denoising loss (`losses`: targets by prediction type, min-SNR
weighting, prior preservation) and DDPM training / sampling as small functions.

Nothing in this package imports diffusers or `customize.training` (tests/test_core_imports.py checks it); interop is
through configs and state dicts."""

from customize.core import losses, schedules
from customize.core.ddim import DDIMScheduler
from customize.core.ddpm import DDPMScheduler, SchedulerConfig, SchedulerOutput
from customize.core.train import ddpm_loss, denoise, sample
from customize.core.unet import UNet, UNetConfig, config_to_diffusers, from_diffusers_config

__all__ = [
    "losses", "schedules", "DDPMScheduler", "DDIMScheduler", "SchedulerConfig", "SchedulerOutput",
    "UNet", "UNetConfig", "config_to_diffusers", "from_diffusers_config", "ddpm_loss", "denoise", "sample",
]
