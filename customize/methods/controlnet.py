"""ControlNet (Zhang et al., 2023): add spatial control (edges, masks, scribbles, ...) to a frozen Stable Diffusion
1.x/2.x or SDXL model by training a copy of its encoder on (conditioning image, image, caption) triples.

The ControlNet F is a copy of the UNet's input convolution, down blocks and mid block (the "trainable copy",
initialised from the UNet's weights, `ControlNetModel.from_unet`), plus
  - a small conditioning encoder E (a few 3x3 convolutions, stride 2 each, down to the latent grid) whose last
    convolution is zero: E(c) = 0 at init; its output is added to the copy's input, F's conv_in(x_t) + E(c);
  - one 1x1 "zero convolution" Z_i per skip connection of the encoder and one for the mid block, weights and
    biases zero at init.
The residuals r_i = Z_i(h_i) are added to the frozen UNet's skips and mid block (`down_block_additional_residuals`,
`mid_block_additional_residual`):

    eps_theta(x_t, t, y, c) = UNet(x_t, t, y; skips + s * r(x_t, t, y, c), mid + s * r_mid(x_t, t, y, c))

At init every residual is exactly zero, so the model is the base model, while the gradient into each Z_i is not:
dL/dW_Z = dL/dr * h_i, with h_i the copy's activations (non-zero), so the zero convolutions learn first and the
rest follows (dL/dh_i = W_Z^T dL/dr is zero at the very first step only). Training never harms the base model
early; the result is the "sudden convergence" of the paper (section 4.1): the output follows the control image
abruptly, after a few thousand steps on SD 1.5.

The loss is the base model's own denoising loss (`customize.training.sd.batch_loss`, with the ControlNet's
residuals as extra UNet inputs), UNet, VAE and text encoders frozen; only F trains.

Prompt dropping (`proportion_empty_prompts`, the paper trains with 50 %): each example's caption is replaced, with
that probability and per step, by the empty prompt, whose text embedding is computed once (`prepare`), so the
ControlNet learns to read the control image on its own (what makes guess mode and low guidance work).

Cached per example (with `cache_latents`, by the shared feature cache, a training batch at a time): the VAE moments
of the image, the text states of the caption (SDXL: both encoders' states and the pooled embedding) and the
conditioning image as uint8 (a quarter of float32's memory). A step then runs the ControlNet and the UNet only.

The result is a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors, written atomically
into output_dir) that `ControlNetModel.from_pretrained(output_dir)` loads, for `StableDiffusionControlNetPipeline`
(or the XL one), `customize generate --controlnet output_dir`, A1111 / ComfyUI (after conversion).

    accelerate launch recipes/train_controlnet.py --pretrained_model_name_or_path tiny-sd \
        --train_data_dir data/fill50k --output_dir outputs/cn --max_train_steps 5000
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from customize.data import ImageCaptionDataset, cache_features, collate_examples
from customize.data.datasets import paired_key
from customize.methods import dreambooth
from customize.methods.lora import cast_frozen_weights
from customize.training import sd
from customize.training.config import PairedDataConfig

CONDITIONING = "conditioning_image"  # the paired image's name in the dataset
CONDITIONING_KEY = paired_key(CONDITIONING)  # "conditioning_pixel_values": (B, 3, H, W) in [-1, 1]
CACHED_CONDITIONING = "conditioning_uint8"  # the cache's copy: (B, 3, H, W) uint8
WEIGHTS = ("config.json", "diffusion_pytorch_model.safetensors")
SCORES = ("mask_iou", "edge_f1")  # validation_score's measures (`controllability`)
# The conditioning encoder's widths when it needs 3 stride-2 stages (VAE factor 8, SD / SDXL): diffusers' default.
CONDITIONING_CHANNELS = (16, 32, 96, 256)


@dataclass
class ControlNetConfig(PairedDataConfig):
    controlnet_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from this ControlNet (a folder or hub id); unset: a copy of the UNet's "
                                        "encoder with zero convolutions."})
    image_column: str = field(default="image", metadata={"help": "Column of the target images (--dataset_name)."})
    conditioning_image_column: str = field(
        default="conditioning_image", metadata={"help": "Column of the conditioning images (a folder: the "
                                                        "metadata.jsonl column <this>_file_name)."})
    caption_column: str | None = field(default="text", metadata={"help": "Column of the captions."})
    proportion_empty_prompts: float = field(
        default=0.0, metadata={"help": "Fraction of captions replaced by the empty prompt at each step, in [0, 1) "
                                       "(the paper: 0.5)."})
    validation_image: list[str] | None = field(
        default=None, metadata={"help": "Conditioning image(s) of the validation samples (with --validation_prompt)."})
    validation_score: str = field(
        default="auto", metadata={"help": "Controllability scored at each validation, logged and drawn into "
                                          "validation/scores.png: mask_iou (toy-world shape masks), edge_f1 (canny "
                                          "control), auto (mask_iou for filled binary control images, else edge_f1) "
                                          "or none."})
    learning_rate: float = 1e-5
    max_train_steps: int = 5000
    adam_weight_decay: float = 1e-2

    RESUME_FREE: ClassVar[frozenset[str]] = PairedDataConfig.RESUME_FREE

    def __post_init__(self):
        super().__post_init__()
        if not (0.0 <= self.proportion_empty_prompts < 1.0):
            raise ValueError(f"proportion_empty_prompts must be in [0, 1), got {self.proportion_empty_prompts}")
        if self.validation_score not in SCORES + ("auto", "none"):
            raise ValueError(f"validation_score must be one of {', '.join(SCORES + ('auto', 'none'))}, got "
                             f"{self.validation_score!r}")

    def check_inputs(self) -> None:
        """What a run cannot start without (the dataclass lets it be None so `--help` works)."""
        self.check_data_source("ControlNet")
        if self.validation_image and not self.validation_prompt:
            raise ValueError("--validation_image needs --validation_prompt")
        for path in self.validation_image or []:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--validation_image {path}: no such file")


# ---------------------------------------------------------------------------------------------------------------
# The model: the base pipeline's components plus the ControlNet
# ---------------------------------------------------------------------------------------------------------------


def new_controlnet(pipe):
    """A ControlNet copied from the UNet (`ControlNetModel.from_unet`): input convolution, time and added
    embeddings, down blocks and mid block with the UNet's weights; zero convolutions and the conditioning
    encoder's last convolution zero. The conditioning encoder has one stride-2 stage per halving of the VAE, so it
    reads images at pixel size and outputs at latent size (diffusers' (16, 32, 96, 256) for a factor of 8)."""
    from diffusers import ControlNetModel

    from customize.models import vae_scale_factor

    stages = int(round(math.log2(vae_scale_factor(pipe.vae))))
    channels = CONDITIONING_CHANNELS[: stages + 1] if stages < len(CONDITIONING_CHANNELS) else \
        CONDITIONING_CHANNELS + (CONDITIONING_CHANNELS[-1],) * (stages + 1 - len(CONDITIONING_CHANNELS))
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=channels)
    return net.to(device=sd.first_parameter(pipe.unet).device)


def build_model(pipe, cfg: ControlNetConfig):
    """The ControlNet pipeline the engine trains: `pipe`'s components plus a new ControlNet (`new_controlnet`) or
    the one at cfg.controlnet_model_name_or_path (refused when it is for another base model), in float32."""
    from customize.control import controlnet_pipeline, load_controlnet

    if cfg.controlnet_model_name_or_path:
        net = load_controlnet(cfg.controlnet_model_name_or_path, pipe, dtype=torch.float32)
    else:
        net = new_controlnet(pipe)
    return controlnet_pipeline(pipe, net.float())


def build_dataset(pipe, cfg: ControlNetConfig) -> ImageCaptionDataset:
    """(image, conditioning image, caption) examples from the folder or the datasets-library set; the
    conditioning image gets the image's crop and flip."""
    from customize.models import model_info
    from customize.utils import recover_dir

    if cfg.output_dir:
        recover_dir(cfg.output_dir)
    if cfg.resolution is None:
        cfg.resolution = model_info(pipe).resolution
    sd.check_resolution(pipe, cfg.resolution)
    cfg.check_inputs()
    if cfg.train_data_dir:
        return ImageCaptionDataset.from_folder(
            cfg.train_data_dir, cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
            caption_column=cfg.caption_column, paired_images={CONDITIONING: cfg.conditioning_image_column},
        )
    return ImageCaptionDataset.from_hf(
        cfg.dataset_name, cfg.resolution, image_column=cfg.image_column, caption_column=cfg.caption_column,
        split=cfg.dataset_split, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
        paired_columns={CONDITIONING: cfg.conditioning_image_column},
    )


def conditioning_image(batch: dict) -> torch.Tensor:
    """The ControlNet's input c, (B, 3, H, W) in [0, 1] (the range the pipeline's control image processor gives):
    from the cache's uint8 copy or from the example's [-1, 1] tensor."""
    if CACHED_CONDITIONING in batch:
        return batch[CACHED_CONDITIONING].float() / 255.0
    if CONDITIONING_KEY not in batch:
        raise ValueError("the batch has no conditioning image: build the data set with "
                         "customize.methods.controlnet.build_dataset (each image needs its conditioning image)")
    return (batch[CONDITIONING_KEY].float() + 1.0) / 2.0


def controlnet_residuals(controlnet, x_t, t, cond: dict, time_ids, control: torch.Tensor, scale: float = 1.0) -> dict:
    """The ControlNet's residuals as UNet keywords (`customize.training.sd.UNetInputs`): one (B, C_i, h_i, w_i)
    tensor per skip connection and the mid block's, each multiplied by `scale`."""
    w = sd.first_parameter(controlnet)
    down, mid = controlnet(
        x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], controlnet_cond=control.to(w.device, w.dtype),
        conditioning_scale=scale, added_cond_kwargs=sd.sdxl_added_conditioning(cond, time_ids, x_t.shape[0]),
        return_dict=False,
    )
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class ControlNetMethod:
    """The hooks of customize.training.method; `train(ControlNetMethod(), build_model(pipe, cfg), dataset, cfg)`."""

    def __init__(self):
        self.empty: dict[str, torch.Tensor] | None = None  # the empty prompt's conditioning, (1, L, D) [+ (1, P)]

    def trainable_parameters(self, pipe, cfg: ControlNetConfig):
        """UNet, VAE and text encoders frozen; every ControlNet weight trains."""
        for module in [pipe.vae, pipe.unet, *sd.text_encoders(pipe)]:
            module.requires_grad_(False)
        return list(pipe.controlnet.requires_grad_(True).parameters())

    def prepare(self, pipe, dataset, cfg: ControlNetConfig, accelerator):
        """The empty prompt's embedding (for dropped captions), then with cache_latents the feature cache (VAE
        moments, text states, conditioning image as uint8), then the frozen weights in the autocast dtype."""
        with torch.no_grad():
            self.empty = {k: v.detach() for k, v in sd.encode_prompts(pipe, [""]).items()}
        if cfg.cache_latents:
            dataset = cache_dataset(pipe, dataset, cfg.train_batch_size, cfg.seed)
        cast_frozen_weights(pipe, cfg.mixed_precision)
        return dataset

    collate = staticmethod(collate_examples)

    def loss(self, pipe, batch, cfg: ControlNetConfig):
        return controlnet_loss(pipe, batch, cfg, self.empty)

    def validate(self, pipe, cfg: ControlNetConfig, step: int) -> dict:
        return validate(pipe, cfg, step)

    def save(self, pipe, cfg: ControlNetConfig, out_dir):
        return save(pipe, cfg, out_dir)

    def model_card(self, cfg: ControlNetConfig) -> str:
        return model_card(cfg)


def cache_dataset(pipe, dataset, batch_size: int, seed: int):
    """The shared feature cache over the data set: per example the VAE moments, the text states and the conditioning
    image as uint8 (both flips with random_flip, `customize.data.cache`)."""

    def encode(batch):
        c = batch[CONDITIONING_KEY]  # (B, 3, H, W) in [-1, 1]
        return {
            "latent_moments": sd.image_moments(pipe.vae, batch["pixel_values"]),  # (B, 2C, h, w)
            **sd.encode_prompts(pipe, batch["prompt"]),  # (B, L, D) [+ (B, P)]
            CACHED_CONDITIONING: ((c.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8),
        }

    return cache_features(dataset, encode, batch_size=batch_size, seed=seed, drop=("pixel_values", CONDITIONING_KEY))


def drop_prompts(batch: dict, empty: dict[str, torch.Tensor], proportion: float) -> dict:
    """With probability `proportion` per row, the row's text states become the empty prompt's (one draw of the
    global RNG per row, so a cached and an uncached run drop the same rows)."""
    if not proportion:
        return batch
    rows = batch["encoder_hidden_states"].shape[0]
    drop = torch.rand(rows) < proportion  # (B,)
    if not drop.any():
        return batch
    batch = dict(batch)
    for key, value in empty.items():
        where = drop.to(batch[key].device).view(-1, *([1] * (batch[key].dim() - 1)))
        batch[key] = torch.where(where, value.to(batch[key].device, batch[key].dtype).expand_as(batch[key]), batch[key])
    return batch


def controlnet_loss(pipe, batch: dict, cfg: ControlNetConfig, empty: dict | None = None, generator=None):
    """The denoising loss of the frozen UNet with the ControlNet's residuals added (module docstring). Text states
    come from the cache or are encoded now (never with gradient: the text encoders are frozen); dropped captions get
    the empty prompt's states."""
    if "encoder_hidden_states" not in batch:
        with torch.no_grad():
            batch = {**batch, **sd.encode_prompts(pipe, batch["prompt"])}
    if cfg.proportion_empty_prompts:
        if empty is None:
            with torch.no_grad():
                empty = sd.encode_prompts(pipe, [""])
        batch = drop_prompts(batch, empty, cfg.proportion_empty_prompts)
    control = conditioning_image(batch)  # (B, 3, H, W) in [0, 1]

    def residuals(x_t, t, cond, time_ids):
        return controlnet_residuals(pipe.controlnet, x_t, t, cond, time_ids, control)

    return sd.batch_loss(pipe, batch, cfg, generator, unet_inputs=residuals)


def validation_images(cfg: ControlNetConfig) -> list:
    from customize.data.images import open_paired_image

    return [open_paired_image(p, "--validation_image") for p in cfg.validation_image or []]


# ---------------------------------------------------------------------------------------------------------------
# Controllability at validation: the "sudden convergence" made visible
# ---------------------------------------------------------------------------------------------------------------


def control_mask(control) -> np.ndarray:
    """A control image read as a mask: (H, W) bool, grey > 127."""
    return np.asarray(control.convert("L")) > 127


def score_kind(control) -> str:
    """What `validation_score auto` measures for this control image: "mask_iou" when it is a filled mask (only
    black and white, and most white pixels with all four neighbours white: a region, not a line), else
    "edge_f1" (canny and other edge maps: 1-px lines have almost no interior). Near-black or near-white (within
    32 grey levels) counts as black or white, so a resized mask still reads as one."""
    grey = np.asarray(control.convert("L")).astype(np.int16)
    binary = bool(((grey < 32) | (grey > 223)).mean() > 0.95)
    white = grey > 127
    padded = np.pad(white, 1)
    interior = white & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return "mask_iou" if binary and white.any() and interior.sum() > 0.5 * white.sum() else "edge_f1"


def controllability(image, control, kind: str) -> float:
    """How far a generated image follows its control image, in [0, 1]:

    mask_iou  |M_gen & M_c| / |M_gen | M_c|: M_gen the shape the toy world's probe finds in the image
              (`customize.toy.probes.read`, pixels off the measured background), M_c the control mask (grey > 127)
    edge_f1   `customize.control.canny_f1`: the canny map of the image against the control's edges, matched
              within 0.75 % of the diagonal (`edge_tolerance`)

    The image is resized to the control's size first."""
    from customize.control import canny_f1

    if kind == "edge_f1":
        return canny_f1(image, control)
    if kind != "mask_iou":
        raise ValueError(f"controllability kind must be one of {SCORES}, got {kind!r}")
    from customize.toy import probes

    if image.size != control.size:
        image = image.resize(control.size, Image.Resampling.BICUBIC)
    return probes.mask_iou(probes.read(image).mask, control_mask(control))


def validate(pipe, cfg: ControlNetConfig, step: int) -> dict:
    """One strip per validation image: the conditioning image, then num_validation_images samples of the
    validation prompt drawn with it (image i from seed cfg.seed + i), so each sample sits beside its control.
    With validation_score, the mean controllability of every sample against its control
    ("controllability/<kind>", `controllability`) goes with them: the engine logs it to the trackers and draws
    its curve over the run into validation/scores.png, where the paper's sudden convergence shows as a step."""
    import logging

    from customize.inference import generate
    from customize.training.tracking import image_grid

    if not cfg.validation_prompt or not cfg.validation_image:
        return {"images": []}
    device = sd.first_parameter(pipe.unet).device
    dtype = dreambooth.AUTOCAST_DTYPES.get(cfg.mixed_precision)
    n = cfg.num_validation_images
    strips, scores = [], {}
    for control in validation_images(cfg):
        control = control.resize((cfg.resolution, cfg.resolution))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            samples = generate(pipe, [cfg.validation_prompt] * n, [cfg.seed + i for i in range(n)], image=control,
                               num_inference_steps=cfg.validation_inference_steps, height=cfg.resolution,
                               width=cfg.resolution)
        strips.append(image_grid([control, *samples], cols=n + 1))
        if cfg.validation_score != "none":
            kind = score_kind(control) if cfg.validation_score == "auto" else cfg.validation_score
            try:
                scores.setdefault(kind, []).extend(controllability(img, control, kind) for img in samples)
            except ImportError as err:  # edge_f1 without OpenCV: the run goes on, without the curve
                logging.getLogger(__name__).warning("validation_score %s skipped: %s", kind, err)
    return {"images": strips, "logs": {f"controllability/{k}": sum(v) / len(v) for k, v in scores.items()}}


def save(pipe, cfg: ControlNetConfig, out_dir) -> Path:
    """The ControlNet as a diffusers folder (`save_pretrained`: config.json, diffusion_pytorch_model.safetensors)
    written into out_dir atomically (`atomic_pipeline_dir`: the run's checkpoints and logs are carried over)."""
    from customize.utils import atomic_pipeline_dir

    with atomic_pipeline_dir(out_dir, parts=WEIGHTS) as tmp:
        pipe.controlnet.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def model_card(cfg: ControlNetConfig) -> str:
    from customize.training.tracking import model_card_text, run_settings

    data = cfg.train_data_dir or cfg.dataset_name
    settings = {
        "base model": cfg.pretrained_model_name_or_path,
        "started from": cfg.controlnet_model_name_or_path or "a copy of the UNet's encoder (zero convolutions)",
        "data": f"{data} (conditioning column {cfg.conditioning_image_column!r})",
        "empty prompts": cfg.proportion_empty_prompts,
        **run_settings(cfg),
        "learning rate": f"{cfg.learning_rate} ({cfg.lr_scheduler}, warmup {cfg.lr_warmup_steps})",
    }
    return model_card_text(
        f"ControlNet: {Path(cfg.output_dir).resolve().name}",
        f"A ControlNet trained with `customize` on `{cfg.pretrained_model_name_or_path}`. Load it with "
        "`ControlNetModel.from_pretrained(<this folder>)` or `customize generate --controlnet <this folder> "
        "--control-image IMG`.",
        settings,
    )
