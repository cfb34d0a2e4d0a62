"""Beta schedules beta_1..beta_T as pure functions, the zero-terminal-SNR rescale and the SNR helper.

Every function computes in float64 and returns float64; the schedulers store the result as float32 (what the
networks see), so rounding happens once, at the end. No diffusers import in this package.

Notation: ab_t ("alpha bar") = prod_{s <= t} (1 - beta_s), the signal fraction of x_t in the forward process
q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)  (DDPM eq. 4).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

F64 = torch.float64

# DDPM (Ho et al. 2020, section 4) linear endpoints; the `quadratic` schedule of the seed lecture reuses them.
DDPM_BETA_START = 1e-4
DDPM_BETA_END = 0.02
# Nichol & Dhariwal (2021) eq. 17: offset s keeps beta_1 from being vanishingly small; betas capped below 1.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999
# sigmoid schedule: logistic curve over [-6, 6] (GeoDiff / diffusers "sigmoid").
SIGMOID_RANGE = 6.0


def linear(num_train_timesteps: int, beta_start: float = DDPM_BETA_START, beta_end: float = DDPM_BETA_END) -> torch.Tensor:
    """beta_t = linspace(beta_start, beta_end, T) (DDPM)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=F64)


def scaled_linear(num_train_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (latent diffusion / Stable Diffusion)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=F64) ** 2


def quadratic(num_train_timesteps: int, beta_start: float = DDPM_BETA_START, beta_end: float = DDPM_BETA_END) -> torch.Tensor:
    """The seed lecture's quadratic schedule: linspace(sqrt b0, sqrt b1, T)^2 with DDPM's endpoints by default
    (the same curve as `scaled_linear`, different defaults)."""
    return scaled_linear(num_train_timesteps, beta_start, beta_end)


def squaredcos_cap_v2(num_train_timesteps: int, beta_start: float | None = None, beta_end: float | None = None,
                      max_beta: float = COSINE_MAX_BETA) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal eq. 17): beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta) with
    f(t) = cos^2(((t + s) / (1 + s)) * pi / 2). beta_start / beta_end are accepted and ignored (the curve has no
    endpoints), so every schedule shares one call signature."""
    t = torch.arange(num_train_timesteps + 1, dtype=F64) / num_train_timesteps  # (T + 1,)
    f = torch.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)


def sigmoid(num_train_timesteps: int, beta_start: float = DDPM_BETA_START, beta_end: float = DDPM_BETA_END) -> torch.Tensor:
    """beta_t = sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start."""
    x = torch.linspace(-SIGMOID_RANGE, SIGMOID_RANGE, num_train_timesteps, dtype=F64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear,
    "scaled_linear": scaled_linear,
    "squaredcos_cap_v2": squaredcos_cap_v2,
    "cosine": squaredcos_cap_v2,
    "sigmoid": sigmoid,
    "quadratic": quadratic,
}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common diffusion noise schedules and sample steps are flawed"), Algorithm 1: shift and
    scale sqrt(ab_t) so that sqrt(ab_T) = 0 (zero terminal SNR) while sqrt(ab_1) is unchanged."""
    sqrt_ab = torch.cumprod(1 - betas.to(F64), dim=0).sqrt()  # (T,)
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])  # undo the cumulative product
    return 1 - alphas


def make_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = DDPM_BETA_START,
               beta_end: float = DDPM_BETA_END, trained_betas=None, rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """The schedule a scheduler config describes, in float64. `trained_betas` (a list/array) wins over the name."""
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=F64).flatten()
    else:
        if beta_schedule not in SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(SCHEDULES)}")
        betas = SCHEDULES[beta_schedule](num_train_timesteps, beta_start, beta_end)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ab_t = prod_{s <= t} (1 - beta_s), in float64."""
    return torch.cumprod(1 - betas.to(F64), dim=0)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """Signal-to-noise ratio SNR_t = ab_t / (1 - ab_t) (Kingma et al. 2021), at `timesteps` or for all t.
    Computed in float64 and returned in the dtype of `alphas_cumprod`."""
    ab = alphas_cumprod.to(F64)
    if timesteps is not None:
        ab = ab[timesteps.to(ab.device).long()]
    return (ab / (1 - ab)).to(alphas_cumprod.dtype)
