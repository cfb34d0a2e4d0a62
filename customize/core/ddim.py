"""DDIM scheduler (Song et al. 2021) with the diffusers scheduler surface, plus the deterministic inversion step.

The DDIM update (Song et al. eq. 12), from timestep t to prev = t - T // N:

    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma_t^2) eps_hat + sigma_t z,
    sigma_t = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))          (eq. 16)

eta = 0 is the deterministic sampler, eta = 1 the DDPM posterior. After the last step ab_prev is
`final_alpha_cumprod` (1 with set_alpha_to_one, else ab_0, as Stable Diffusion configs ask).
"""

from __future__ import annotations

import numpy as np
import torch

from customize.core import schedules
from customize.core.ddpm import DiffusionScheduler, SchedulerOutput, randn_like_diffusers


class DDIMScheduler(DiffusionScheduler):
    """Drop-in for diffusers' DDIMScheduler: same config keys and defaults, same `step` outputs, and
    `set_timesteps(timesteps=[...])` for a custom descending schedule (then each step goes to the next listed
    timestep instead of t - T // N)."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = schedules.DDPM_BETA_START,
        beta_end: float = schedules.DDPM_BETA_END,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._register_config(dict(locals()))
        self._build_schedule()
        self.final_alpha_cumprod = self.one if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None):
        """N timesteps spaced by `timestep_spacing` (+ steps_offset for "leading"), or a custom descending list."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.int64)
            if np.any(np.diff(ts) >= 0) or ts[0] >= self.config.num_train_timesteps or ts[-1] < 0:
                raise ValueError(f"custom timesteps must be strictly descending within [0, "
                                 f"{self.config.num_train_timesteps}), got {list(ts)}")
            self.custom_timesteps = True
            self.num_inference_steps = len(ts)
        else:
            ts = self._spaced_timesteps(num_inference_steps)
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts.copy()).to(device)

    def previous_timestep(self, timestep) -> int:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before stepping a DDIM scheduler")
        t = int(timestep)
        if not self.custom_timesteps:
            return t - self.config.num_train_timesteps // self.num_inference_steps
        index = (self.timesteps == t).nonzero(as_tuple=True)[0]
        if len(index) == 0:
            raise ValueError(f"timestep {t} is not in the custom scheduler.timesteps")
        index = int(index[0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def _ab_or_final(self, t: int, like: torch.Tensor) -> torch.Tensor:
        return self._ab(t, like) if t >= 0 else self._ab_final(like)

    def _ab_final(self, like: torch.Tensor) -> torch.Tensor:
        return self.final_alpha_cumprod.double() if like.dtype == torch.float64 else self.final_alpha_cumprod

    def _get_variance(self, timestep: int, prev_timestep: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """sigma_t^2 / eta^2 = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev) (DDIM eq. 16)."""
        like = self.alphas_cumprod if like is None else like
        ab_t, ab_prev = self._ab(timestep, like), self._ab_or_final(prev_timestep, like)
        return ((1 - ab_prev) / (1 - ab_t)) * (1 - ab_t / ab_prev)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True):
        """x_t -> x_prev by DDIM eq. 12. With `use_clipped_model_output` eps_hat is recomputed from the clipped
        x0_hat. For eta > 0 the noise z comes from `generator` (drawn like diffusers) or `variance_noise`."""
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        ab_t, ab_prev = self._ab(t, sample), self._ab_or_final(prev_t, sample)
        x0, eps = self._predict_x0_eps(model_output, sample, ab_t)
        x0 = self._clip_x0(x0)
        std = eta * self._get_variance(t, prev_t, sample) ** 0.5
        if use_clipped_model_output:
            eps = (sample - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
        prev_sample = ab_prev**0.5 * x0 + (1 - ab_prev - std**2) ** 0.5 * eps  # (B, C, H, W)
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std * variance_noise
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def inversion_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Deterministic DDIM inversion (eta = 0), the step run backwards: from the level below `timestep`
        (prev = t - T // N, or `final_alpha_cumprod` below 0) up to `timestep`:
            x_t = sqrt(ab_t) x0_hat + sqrt(1 - ab_t) eps_hat,  (x0_hat, eps_hat) read at ab_prev.
        `timestep` is the entry of `self.timesteps` being reached, so running the timesteps in ascending
        order inverts an image to noise (null-text inversion pivots); with a model output that does not
        depend on x, `step(out, t, inversion_step(out, t, x))` gives back x. Matches diffusers'
        DDIMInverseScheduler.step."""
        t = int(timestep)
        src = min(self.previous_timestep(t), self.config.num_train_timesteps - 1)
        ab_src, ab_t = self._ab_or_final(src, sample), self._ab(t, sample)
        x0, eps = self._predict_x0_eps(model_output, sample, ab_src)
        x0 = self._clip_x0(x0)
        next_sample = ab_t**0.5 * x0 + (1 - ab_t) ** 0.5 * eps
        if not return_dict:
            return next_sample, x0
        return SchedulerOutput(prev_sample=next_sample, pred_original_sample=x0)
