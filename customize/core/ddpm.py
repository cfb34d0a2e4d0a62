"""DDPM scheduler (Ho et al. 2020) with the diffusers scheduler surface, and the machinery DDIM shares with it.

`DiffusionScheduler` holds what every discrete-time Gaussian scheduler needs: the config (a frozen mapping
that also reads as attributes, like diffusers' FrozenDict, so `pipe.scheduler = DDPMScheduler.from_config(
pipe.scheduler.config)` works and diffusers' `from_config` reads ours back), the beta schedule, the forward
process (`add_noise`, `get_velocity`), the model-output parameterisations and timestep spacing.
`DDPMScheduler` adds ancestral sampling from the posterior q(x_{t-1} | x_t, x_0).

Step coefficients are computed from the stored float32 `alphas_cumprod` with diffusers' operations in
diffusers' order, so given the same alphas_cumprod a step is bit-for-bit diffusers' step; float64 samples get
float64 arithmetic.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from customize.core import schedules

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
# Posterior variance at t = 1 is 0; diffusers clamps it so that log() in the *_log / learned_range types is finite.
MIN_POSTERIOR_VARIANCE = 1e-20
SCHEDULER_CONFIG_NAME = "scheduler_config.json"


class SchedulerConfig(dict):
    """A read-only dict whose keys also read as attributes (`config.num_train_timesteps`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no field {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a scheduler config is frozen; build a new scheduler with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = update = pop = popitem = setdefault = clear = _readonly

    def __reduce__(self):
        # copy / deepcopy / pickle rebuild through __init__ (the item setters above refuse writes)
        return (type(self), (dict(self),))


@dataclass
class SchedulerOutput:
    """What `step` returns: x_{t-1} and the model's estimate of x_0. Indexable like diffusers' outputs."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def to_tuple(self) -> tuple:
        return (self.prev_sample, self.pred_original_sample)

    def __getitem__(self, i):
        return self.to_tuple()[i]

    def __iter__(self):
        return iter(self.to_tuple())


def randn_like_diffusers(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' `randn_tensor` draws it, so the same generator state
    gives the same noise in both libraries: a CPU generator draws on the CPU and the result moves to `device`;
    a list of generators draws one batch row each."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if generator is not None:
        gen_device = (generator[0] if isinstance(generator, (list, tuple)) else generator).device
        if gen_device.type != device.type:
            if gen_device.type != "cpu":
                raise ValueError(f"cannot draw a {device} tensor from a {gen_device} generator; pass a CPU generator")
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        row = (1,) + tuple(shape[1:])
        noise = torch.cat([torch.randn(row, generator=g, device=rand_device, dtype=dtype) for g in generator[: shape[0]]])
    else:
        noise = torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype)
    return noise.to(device)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample coefficients -> (B, 1, 1, ...) to multiply a (B, ...) tensor."""
    return values.flatten().reshape(-1, *([1] * (like.ndim - 1)))


class DiffusionScheduler:
    """Shared base: config handling, betas, forward process, parameterisations, timestep spacing."""

    order = 1
    init_noise_sigma = 1.0
    config_name = SCHEDULER_CONFIG_NAME

    # ---- config ---------------------------------------------------------------------------------------------
    def _register_config(self, params: dict) -> None:
        params = {k: v for k, v in params.items() if k in self._init_keys()}
        if params.get("trained_betas") is not None:
            params["trained_betas"] = [float(b) for b in np.asarray(params["trained_betas"]).ravel()]
        self._check(params)
        self._internal_dict = SchedulerConfig(params, _class_name=type(self).__name__)

    @classmethod
    def _init_keys(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @staticmethod
    def _check(c: dict) -> None:
        if c["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {c['prediction_type']!r} must be one of {PREDICTION_TYPES}")
        if c["timestep_spacing"] not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {c['timestep_spacing']!r} must be one of {TIMESTEP_SPACINGS}")
        if "variance_type" in c and c["variance_type"] not in VARIANCE_TYPES:
            raise ValueError(f"variance_type {c['variance_type']!r} must be one of {VARIANCE_TYPES}")

    @property
    def config(self) -> SchedulerConfig:
        # Read through `_internal_dict` on every access: diffusers pipelines patch a scheduler's config by
        # assigning that attribute (e.g. forcing steps_offset=1), and the patch must take effect here too.
        return self._internal_dict

    @classmethod
    def from_config(cls, config: Mapping | None = None, return_unused_kwargs: bool = False, **kwargs):
        """Build from any scheduler config mapping (ours, a diffusers FrozenDict, a dict read from
        scheduler_config.json). Keys this class does not take (`_class_name`, `skip_prk_steps`, another
        scheduler's options) are ignored; keyword arguments override the mapping."""
        merged = {**dict(config or {}), **kwargs}
        keys = set(cls._init_keys())
        scheduler = cls(**{k: v for k, v in merged.items() if k in keys})
        if return_unused_kwargs:
            return scheduler, {k: v for k, v in merged.items() if k not in keys}
        return scheduler

    def save_config(self, save_directory: str | os.PathLike) -> str:
        """Write scheduler_config.json (diffusers' file name and layout) atomically."""
        from customize.utils import atomic_path

        path = os.path.join(save_directory, self.config_name)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(dict(self.config), indent=2, sort_keys=True) + "\n")
        return path

    save_pretrained = save_config

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None, **kwargs):
        """Read scheduler_config.json from a local folder (a diffusers pipeline folder with subfolder="scheduler")."""
        path = os.path.join(directory, subfolder or "", SCHEDULER_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: pass the folder that holds {SCHEDULER_CONFIG_NAME}")
        with open(path) as f:
            return cls.from_config(json.load(f), **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(dict(self.config), sort_keys=True)})"

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- schedule ---------------------------------------------------------------------------------------------
    def _build_schedule(self) -> None:
        c = self.config
        betas = schedules.make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end,
                                     c.trained_betas, c.rescale_betas_zero_snr)  # (T,) float64
        self.betas = betas.float()
        self.alphas = (1 - betas).float()
        self.alphas_cumprod = schedules.alphas_cumprod(betas).float()  # ab_t, (T,)
        self.one = torch.tensor(1.0)
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def _ab(self, t, like: torch.Tensor) -> torch.Tensor:
        """ab_t as a 0-d tensor in the arithmetic precision for `like`: float32 (diffusers' arithmetic, so
        steps agree bit for bit given the same alphas_cumprod), float64 when the sample is float64."""
        ab = self.alphas_cumprod[int(t)]
        return ab.double() if like.dtype == torch.float64 else ab

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """DDPM/DDIM feed x_t to the model unscaled (kept for drop-in use in pipelines)."""
        return sample

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """N of the T training timesteps, descending, by `timestep_spacing` (Lin et al. 2023, Table 2)."""
        c = self.config
        T, N = c.num_train_timesteps, num_inference_steps
        if N > T:
            raise ValueError(f"num_inference_steps={N} cannot exceed num_train_timesteps={T}")
        if N < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {N}")
        if c.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
        if c.timestep_spacing == "leading":
            return (np.arange(N) * (T // N))[::-1].astype(np.int64) + c.steps_offset
        return np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1  # trailing

    # ---- forward process --------------------------------------------------------------------------------------
    def _sqrt_ab(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device).long()]
        return _broadcast(ab**0.5, like), _broadcast((1 - ab) ** 0.5, like)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0): x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps (DDPM eq. 4), one t per batch row."""
        sqrt_ab, sqrt_one_minus_ab = self._sqrt_ab(timesteps, original_samples)
        return sqrt_ab * original_samples + sqrt_one_minus_ab * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (Salimans & Ho 2022, "v-parameterisation")."""
        sqrt_ab, sqrt_one_minus_ab = self._sqrt_ab(timesteps, sample)
        return sqrt_ab * noise - sqrt_one_minus_ab * sample

    # ---- parameterisations --------------------------------------------------------------------------------------
    def _predict_x0_eps(self, model_output: torch.Tensor, sample: torch.Tensor, ab_t: torch.Tensor):
        """(x0_hat, eps_hat) from the model output at noise level ab_t, by prediction type:
        epsilon: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab);  v: x0 = sqrt(ab) x_t - sqrt(1-ab) v,
        eps = sqrt(ab) v + sqrt(1-ab) x_t;  sample: eps = (x_t - sqrt(ab) x0) / sqrt(1-ab)."""
        kind = self.config.prediction_type
        beta_prod_t = 1 - ab_t
        if kind == "epsilon":
            return (sample - beta_prod_t**0.5 * model_output) / ab_t**0.5, model_output
        if kind == "v_prediction":
            return ab_t**0.5 * sample - beta_prod_t**0.5 * model_output, ab_t**0.5 * model_output + beta_prod_t**0.5 * sample
        return model_output, (sample - ab_t**0.5 * model_output) / beta_prod_t**0.5

    def _threshold_sample(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen, Saharia et al. 2022, section 2.3): per sample, s = the
        `dynamic_thresholding_ratio` quantile of |x0|, clamped to [1, sample_max_value]; x0 <- clamp(x0, -s, s) / s."""
        c = self.config
        dtype = x0.dtype
        flat = x0.reshape(x0.shape[0], -1)  # (B, C*H*W)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile / clamp need float32 on CPU
        s = torch.quantile(flat.abs(), c.dynamic_thresholding_ratio, dim=1)  # (B,)
        s = torch.clamp(s, min=1, max=c.sample_max_value)[:, None]  # (B, 1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)

    def _clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.thresholding:
            return self._threshold_sample(x0)
        if c.clip_sample:
            return x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        return x0


class DDPMScheduler(DiffusionScheduler):
    """Ancestral sampling x_{t-1} ~ q(x_{t-1} | x_t, x0_hat) (DDPM eq. 6-7, Algorithm 2), diffusers' defaults.

    `set_timesteps(N)` subsamples the chain; the step then goes to the next listed timestep, with the
    effective beta'_t = 1 - ab_t / ab_prev of the skipped interval."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = schedules.DDPM_BETA_START,
        beta_end: float = schedules.DDPM_BETA_END,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._register_config(dict(locals()))
        self._build_schedule()
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None):
        """Choose the sampling timesteps: N spaced ones, or a custom strictly descending list."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.int64)
            if np.any(np.diff(ts) >= 0):
                raise ValueError(f"custom timesteps must be strictly descending, got {list(ts)}")
            if ts[0] >= self.config.num_train_timesteps:
                raise ValueError(f"custom timesteps must be < num_train_timesteps={self.config.num_train_timesteps}")
            self.custom_timesteps = True
            self.num_inference_steps = len(ts)
        else:
            ts = self._spaced_timesteps(num_inference_steps)
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts.copy()).to(device)

    def previous_timestep(self, timestep):
        """The timestep the chain moves to from `timestep`: the next listed one (-1 after the last), or t - 1
        when no inference schedule was set."""
        if self.num_inference_steps is None:
            return int(timestep) - 1
        index = (self.timesteps == timestep).nonzero(as_tuple=True)[0]
        if len(index) == 0:
            raise ValueError(f"timestep {int(timestep)} is not in scheduler.timesteps; call set_timesteps first")
        index = int(index[0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def _alphas(self, t: int, prev_t: int, like: torch.Tensor):
        """(ab_t, ab_prev, alpha'_t) with ab_prev = 1 past the end and alpha'_t = ab_t / ab_prev = 1 - beta'_t,
        the alpha of the (possibly skipped) interval prev_t -> t."""
        ab_t = self._ab(t, like)
        ab_prev = self._ab(prev_t, like) if prev_t >= 0 else self.one.to(ab_t.dtype)
        return ab_t, ab_prev, ab_t / ab_prev

    def posterior_variance(self, timestep, like: torch.Tensor | None = None) -> torch.Tensor:
        """Var q(x_prev | x_t, x_0) = (1 - ab_prev) / (1 - ab_t) * beta'_t (DDPM eq. 7), clamped at 1e-20."""
        like = self.alphas_cumprod if like is None else like
        ab_t, ab_prev, alpha_t = self._alphas(int(timestep), self.previous_timestep(timestep), like)
        return torch.clamp((1 - ab_prev) / (1 - ab_t) * (1 - alpha_t), min=MIN_POSTERIOR_VARIANCE)

    def _noise_std(self, timestep, like: torch.Tensor, predicted_variance: torch.Tensor | None):
        """Standard deviation of the added noise for `variance_type`.
        fixed_small: sqrt of the posterior variance; fixed_large: sqrt(beta'_t) (DDPM section 3.2 gives both);
        learned: the model's second output *is* the variance (diffusers' convention);
        learned_range: log-variance interpolated between the two, frac = (v + 1) / 2 (Nichol & Dhariwal eq. 15).
        The *_log types give the same noise as their plain forms (diffusers' fixed_large_log step is NaN)."""
        small = self.posterior_variance(timestep, like)
        beta_t = 1 - self._alphas(int(timestep), self.previous_timestep(timestep), like)[2]
        kind = self.variance_type
        if kind in ("fixed_small", "fixed_small_log"):
            return torch.exp(0.5 * torch.log(small)) if kind == "fixed_small_log" else small**0.5
        if kind in ("fixed_large", "fixed_large_log"):
            return beta_t**0.5
        if predicted_variance is None:
            raise ValueError(f"variance_type={kind!r} needs a model output with 2x the sample channels")
        if kind == "learned":
            return predicted_variance**0.5
        frac = (predicted_variance + 1) / 2
        return torch.exp(0.5 * (frac * torch.log(beta_t) + (1 - frac) * torch.log(small)))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, variance_noise: torch.Tensor | None = None):
        """One ancestral step x_t -> x_prev (DDPM Algorithm 2 line 4, with x0_hat): x0_hat from the model output
        (clipped or thresholded), posterior mean (DDPM eq. 7)
            mu = sqrt(ab_prev) beta'_t / (1 - ab_t) x0_hat + sqrt(1 - beta'_t) (1 - ab_prev) / (1 - ab_t) x_t,
        plus std * z for t > 0, z from `generator` (drawn like diffusers) or the given `variance_noise`."""
        t = int(timestep)
        predicted_variance = None
        if model_output.shape[1] == 2 * sample.shape[1] and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        ab_t, ab_prev, alpha_t = self._alphas(t, self.previous_timestep(t), sample)
        x0, _ = self._predict_x0_eps(model_output, sample, ab_t)
        x0 = self._clip_x0(x0)
        coef_x0 = (ab_prev**0.5 * (1 - alpha_t)) / (1 - ab_t)
        coef_xt = alpha_t**0.5 * (1 - ab_prev) / (1 - ab_t)
        prev_sample = coef_x0 * x0 + coef_xt * sample
        if t > 0:
            if variance_noise is None:
                variance_noise = randn_like_diffusers(model_output.shape, generator, model_output.device, model_output.dtype)
            elif generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            prev_sample = prev_sample + self._noise_std(t, sample, predicted_variance) * variance_noise
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
