"""The from-scratch diffusion core: beta schedules, DDPM / DDIM schedulers with the diffusers surface, a UNet
that loads diffusers' UNet2DModel weights, and DDPM training / sampling as small functions.

Nothing in this package imports diffusers; interop is through configs and state dicts."""

from customize.core import schedules
from customize.core.ddim import DDIMScheduler
from customize.core.ddpm import DDPMScheduler, SchedulerConfig, SchedulerOutput

__all__ = ["schedules", "DDPMScheduler", "DDIMScheduler", "SchedulerConfig", "SchedulerOutput"]
