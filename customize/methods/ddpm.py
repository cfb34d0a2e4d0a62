"""DDPM in pixel space (Ho et al. 2020) on the shared engine: the from-scratch core UNet and schedulers.

    model = build_model(cfg, num_classes)             # DDPMModel(unet, noise_scheduler)
    train(DDPM(), model, dataset, cfg)                # customize.training.train

The loss is Algorithm 1 (`customize.core.train.ddpm_loss`); validation draws a grid with DDIM
(`customize.core.train.sample`). The result is a diffusers DDPMPipeline folder (model_index.json, unet/,
scheduler/) that `diffusers.DDPMPipeline.from_pretrained` loads, and that `load_ddpm` reads back into the core
UNet without diffusers. The method also drives a diffusers UNet2DModel (the benchmark's reference): the hooks
only call the network and read `.parameters()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from customize.core import DDIMScheduler, DDPMScheduler
from customize.core.train import ddpm_loss, sample
from customize.core.unet import UNet, UNetConfig, from_diffusers_config
from customize.training import TrainConfig
from customize.utils import atomic_pipeline_dir

# Beta schedules diffusers' DDPMScheduler knows by name; others are exported as trained_betas.
DIFFUSERS_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
VALIDATION_SEED = 0


@dataclass
class DDPMConfig(TrainConfig):
    """Options of recipes/train_ddpm.py (flag names follow diffusers' train_unconditional.py where it has them)."""

    dataset_name: str | None = field(default=None, metadata={"help": "'digits' for scikit-learn's 8x8 digits; "
                                                                     "else give --train_data_dir."})
    train_data_dir: str | None = field(default=None, metadata={"help": "Image folder; with --class_conditional, "
                                                                       "one sub-folder per class."})
    class_conditional: bool = field(default=False, metadata={"help": "Condition the UNet on the class label."})
    resolution: int = field(default=8, metadata={"help": "Training image size (square)."})
    grayscale: bool = field(default=False, metadata={"help": "Train on 1-channel images (digits always are)."})
    center_crop: bool = field(default=True, metadata={"help": "Crop the centre of each image (else a random crop)."})
    random_flip: bool = field(default=False, metadata={"help": "Flip images horizontally at random."})
    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from a saved DDPM folder (this recipe's output or a diffusers "
                                        "DDPMPipeline/UNet2DModel folder) instead of a fresh UNet."})
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64],
                                          metadata={"help": "Channels of each resolution level."})
    layers_per_block: int = field(default=2, metadata={"help": "ResNet blocks per resolution level."})
    attention_levels: str = field(default="1", metadata={"help": "Comma-separated levels (0 = full resolution) "
                                                                  "with self-attention; '' for none."})
    attention_head_dim: int = field(default=32, metadata={"help": "Channels per self-attention head."})
    norm_num_groups: int = field(default=8, metadata={"help": "Groups of the GroupNorm layers (must divide every "
                                                              "level's channels)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout inside the ResNet blocks, in [0, 1)."})
    ddpm_num_steps: int = field(default=1000, metadata={"help": "Diffusion steps T."})
    ddpm_beta_schedule: str = field(default="squaredcos_cap_v2", metadata={
        "help": "linear, scaled_linear, squaredcos_cap_v2 (cosine), sigmoid or quadratic. Cosine is the default: the "
                "linear schedule destroys small images too early (Nichol & Dhariwal 2021; bench/ddpm_digits.py)."})
    prediction_type: str = field(default="epsilon", metadata={"help": "epsilon, v_prediction or sample."})
    snr_gamma: float | None = field(default=5.0, metadata={"help": "min-SNR-gamma loss weighting (Hang et al. 2023); "
                                                                    "0 or None for plain L_simple."})
    ddpm_num_inference_steps: int = field(default=25, metadata={"help": "DDIM steps of the validation samples."})
    num_validation_images: int = field(default=16, metadata={"help": "Samples per validation (a grid)."})
    # Defaults tuned on the digits (bench/ddpm_digits.py): a 1 M-parameter UNet reaches real-digit quality in
    # ~1,000 steps of 64 on one CPU thread.
    learning_rate: float = 2e-3
    train_batch_size: int = 64
    max_train_steps: int = 3000
    lr_warmup_steps: int = 100
    lr_scheduler: str = "cosine"
    adam_weight_decay: float = 0.0
    use_ema: bool = True
    ema_decay: float = 0.995
    validation_steps: int = 500

    def __post_init__(self):
        super().__post_init__()
        if self.dataset_name not in (None, "digits"):
            raise ValueError(f"dataset_name must be 'digits' (or unset with --train_data_dir), got {self.dataset_name!r}")
        if (self.dataset_name is None) == (self.train_data_dir is None):
            raise ValueError("give exactly one of --dataset_name digits or --train_data_dir FOLDER")
        if self.snr_gamma is not None and self.snr_gamma < 0:
            raise ValueError(f"snr_gamma must be >= 0 (0 or unset: plain L_simple), got {self.snr_gamma}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {self.resolution}: e.g. 8 for the "
                             "digits, 32 or 64 for an image folder")

    def attention_flags(self) -> tuple[bool, ...]:
        levels = {int(s) for s in self.attention_levels.split(",") if s.strip()}
        bad = levels - set(range(len(self.block_out_channels)))
        if bad:
            raise ValueError(f"attention_levels {sorted(bad)} outside the {len(self.block_out_channels)} levels")
        return tuple(i in levels for i in range(len(self.block_out_channels)))


@dataclass
class DDPMModel:
    """What the engine trains: the denoiser (ours, or a diffusers UNet2DModel) and its training scheduler."""

    unet: nn.Module
    noise_scheduler: object
    classes: list[str] = field(default_factory=list)  # class index -> name, for class-conditional models


def build_dataset(cfg: DDPMConfig):
    from customize.data.folder import DigitsDataset, ImageFolderDataset

    if cfg.dataset_name == "digits":
        return DigitsDataset(resolution=cfg.resolution)
    return ImageFolderDataset(cfg.train_data_dir, cfg.resolution, channels=1 if cfg.grayscale else 3,
                              class_conditional=cfg.class_conditional, random_flip=cfg.random_flip,
                              center_crop=cfg.center_crop)


def build_model(cfg: DDPMConfig, channels: int, classes: list[str] | None = None) -> DDPMModel:
    """A fresh core UNet + DDPMScheduler from the config, or the saved model named by
    --pretrained_model_name_or_path."""
    classes = list(classes or [])
    if cfg.pretrained_model_name_or_path:
        model = load_ddpm(cfg.pretrained_model_name_or_path)
        got = num_classes(model.unet)
        if cfg.class_conditional and got != len(classes):
            raise ValueError(f"{cfg.pretrained_model_name_or_path} has {got} classes, the data {len(classes)}")
        return DDPMModel(model.unet, model.noise_scheduler, classes or model.classes)
    # The initial weights are a function of the seed: a resumed run and a fresh one must agree on them.
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        unet = UNet(UNetConfig(
            in_channels=channels, out_channels=channels, channels=tuple(cfg.block_out_channels),
            layers_per_level=cfg.layers_per_block, down_attention=cfg.attention_flags(),
            head_dim=cfg.attention_head_dim, norm_groups=cfg.norm_num_groups, dropout=cfg.dropout,
            sample_size=cfg.resolution, num_class_embeds=len(classes) if cfg.class_conditional else None,
        ))
    scheduler = DDPMScheduler(num_train_timesteps=cfg.ddpm_num_steps, beta_schedule=cfg.ddpm_beta_schedule,
                              prediction_type=cfg.prediction_type)
    return DDPMModel(unet, scheduler, classes if cfg.class_conditional else [])


def num_classes(unet) -> int | None:
    """Class count of a class-conditional denoiser (ours: UNetConfig, diffusers: FrozenDict), else None."""
    return getattr(unet.config, "num_class_embeds", None)


def sample_images(model: DDPMModel, num_images: int, num_inference_steps: int, seed: int = VALIDATION_SEED,
                  class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (eta 0) samples in [-1, 1] (N, C, H, W); class-conditional models cycle through the classes."""
    unet = model.unet
    cfg = unet.config
    channels = cfg.in_channels
    size = cfg.sample_size
    if size is None:
        raise ValueError("the UNet config has no sample_size: set it to the training resolution")
    if class_labels is None and num_classes(unet):
        class_labels = torch.arange(num_images) % num_classes(unet)
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    return sample(unet, scheduler, (num_images, channels, size, size), num_inference_steps=num_inference_steps,
                  class_labels=class_labels, generator=generator).clamp(-1, 1)


def to_pil(x: torch.Tensor) -> list:
    """(N, C, H, W) in [-1, 1] -> RGB PIL images (grayscale repeated on the three channels)."""
    from customize.data.transforms import tensor_to_pil

    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return [tensor_to_pil(img) for img in x]


class DDPM:
    """The engine hooks for pixel-space DDPM."""

    def trainable_parameters(self, model: DDPMModel, cfg: DDPMConfig):
        return list(model.unet.parameters())

    def loss(self, model: DDPMModel, batch: dict, cfg: DDPMConfig):
        labels = batch["class_labels"] if num_classes(model.unet) else None
        return ddpm_loss(model.unet, model.noise_scheduler, batch["pixel_values"], labels, snr_gamma=cfg.snr_gamma)

    def validate(self, model: DDPMModel, cfg: DDPMConfig, step: int):
        return to_pil(sample_images(model, cfg.num_validation_images, cfg.ddpm_num_inference_steps))

    def save(self, model: DDPMModel, cfg: DDPMConfig, out_dir) -> Path:
        return save_ddpm(model, out_dir)

    def model_card(self, cfg: DDPMConfig) -> str:
        data = "scikit-learn digits" if cfg.dataset_name == "digits" else f"`{cfg.train_data_dir}`"
        kind = "class-conditional" if cfg.class_conditional else "unconditional"
        return (
            f"# DDPM ({kind}) trained with customize\n\n"
            f"- data: {data} at {cfg.resolution}px\n- steps: {cfg.max_train_steps}, batch {cfg.train_batch_size}, "
            f"lr {cfg.learning_rate}, EMA {cfg.use_ema} ({cfg.ema_decay})\n"
            f"- schedule: {cfg.ddpm_beta_schedule}, T = {cfg.ddpm_num_steps}, prediction {cfg.prediction_type}\n\n"
            "Load with `diffusers.DDPMPipeline.from_pretrained(folder)` or `customize.methods.ddpm.load_ddpm(folder)`.\n"
        )


# ---------------------------------------------------------------------------------------------------------------
# Files: a diffusers DDPMPipeline folder
# ---------------------------------------------------------------------------------------------------------------


def _diffusers_scheduler_config(scheduler) -> dict:
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    if config.get("trained_betas") is None and config.get("beta_schedule") not in DIFFUSERS_BETA_SCHEDULES:
        config["trained_betas"] = [float(b) for b in scheduler.betas]
    return config


def save_ddpm(model: DDPMModel, out_dir) -> Path:
    """Write model_index.json, unet/ (UNet2DModel config + safetensors) and scheduler/ into `out_dir`, swapped in
    whole by the shared pipeline writer (`customize.utils.atomic_pipeline_dir`). Returns `out_dir`."""
    import diffusers

    out_dir = Path(out_dir)
    unet = model.unet
    if isinstance(unet, UNet):
        reference = diffusers.UNet2DModel(**unet.diffusers_config())
        reference.load_state_dict(unet.diffusers_state_dict())
        unet = reference
    scheduler = diffusers.DDPMScheduler.from_config(_diffusers_scheduler_config(model.noise_scheduler))
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    with atomic_pipeline_dir(out_dir, parts=("classes.json",)) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if model.classes:
            (tmp / "classes.json").write_text(json.dumps(model.classes) + "\n")
    return out_dir


def load_ddpm(folder) -> DDPMModel:
    """Read a DDPMPipeline folder (or a bare UNet2DModel folder) into the core UNet and DDPMScheduler, without
    diffusers."""
    from safetensors.torch import load_file

    folder = Path(folder)
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    config_file, weights = unet_dir / "config.json", unet_dir / "diffusion_pytorch_model.safetensors"
    for path in (config_file, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {folder} is not a DDPM / UNet2DModel folder in safetensors")
    unet = UNet(from_diffusers_config(json.loads(config_file.read_text())))
    unet.load_diffusers_state_dict(load_file(str(weights)))
    if (folder / "scheduler").is_dir():
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    else:
        scheduler = DDPMScheduler()
    classes_file = folder / "classes.json"
    classes = json.loads(classes_file.read_text()) if classes_file.is_file() else []
    return DDPMModel(unet.eval(), scheduler, classes)
