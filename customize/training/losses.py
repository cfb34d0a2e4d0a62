"""The denoising objective of every training method: `customize.core.losses` (the one copy; pure tensor math, so
the from-scratch core uses it without the engine), re-exported here where the methods look for it."""

from customize.core.losses import (  # noqa: F401
    PREDICTION_TYPES,
    denoising_loss,
    diffusion_loss,
    min_snr_weights,
    per_sample_mse,
    prediction_target,
    sample_noise,
    sample_timesteps,
    snr,
)

__all__ = ["PREDICTION_TYPES", "denoising_loss", "diffusion_loss", "min_snr_weights", "per_sample_mse",
           "prediction_target", "sample_noise", "sample_timesteps", "snr"]
