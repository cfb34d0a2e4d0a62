"""InstructPix2Pix (Brooks et al., 2023): edit an image by a written instruction ("make the shape blue") in one
forward pass, by fine-tuning a Stable Diffusion 1.x/2.x or SDXL UNet on (input image, instruction, edited image)
triplets.

The model. The edited image's latent z (the training target) is noised as always, z_t = sqrt(abar_t) z +
sqrt(1 - abar_t) eps; the UNet additionally reads the input image's latent c_I = E(x_input), concatenated on the
channels, and the instruction c_T through cross-attention:

    eps_theta(z_t, t, c_I, c_T) = UNet(cat([z_t, c_I], dim=1), t, c_T)      (B, 4 + 4, h, w) -> (B, 4, h, w)

The UNet's first layer, conv_in, is widened from 4 to 8 input channels: the weights of the first 4 (the latent)
are the base model's, the 4 new ones (the image) are zero, and the bias is kept (`widen_conv_in`). A convolution
is linear in its input channels, W * cat([z_t, c]) + b = W_z * z_t + W_c * c + b, so with W_c = 0 the widened
UNet equals the base UNet whatever c holds: training starts from the text-to-image model and learns to read the
image through the gradient into W_c (dL/dW_c = dL/dh * c, non-zero from the first step). (diffusers' example
script widens without copying the bias, diffusers#4960, so its "widened == base" does not hold.)

c_I is the VAE posterior's MODE (its mean) of the input image, unscaled: not multiplied by the VAE's scaling
factor, and not sampled. That is what both diffusers pipelines feed at inference (`prepare_image_latents`:
`retrieve_latents(vae.encode(image), sample_mode="argmax")`, no scaling outside CosXL), so training must
feed the same. The target z is the usual scaled latent sample of the edited image.

Conditioning dropout (the paper, section 3.2.1), for the two-scale classifier-free guidance: per example, with
u ~ U(0, 1) and p = conditioning_dropout_prob (the paper: 0.05),

    u in [0, p)     drop the text only       (c_T -> null text)
    u in [p, 2p)    drop both
    u in [2p, 3p)   drop the image only      (c_I -> 0)

so 5 / 5 / 5 % of the examples train eps(I, 0), eps(0, 0) and eps(0, T) at p = 0.05, and 85 % eps(I, T). The
null text is what inference feeds for no text: SD's pipeline encodes the empty prompt; SDXL's, with its default
force_zeros_for_empty_prompt, uses zeros for BOTH the text states and the pooled embedding, so for SDXL both are
zeroed together (`null_condition`; diffusers' SDXL script drops the prompt but not its pooled embedding and uses
the empty prompt's encoding, diffusers#7920). The null image is zeros, as in both pipelines.

Sampling (`customize.inference.instruct_edit`, the pipelines' formula) with an image scale s_I and a text scale
s_T:

    eps = eps(0, 0) + s_I (eps(I, 0) - eps(0, 0)) + s_T (eps(I, T) - eps(I, 0))      (`guided_noise`)

with s_I = s_T = 1 it is eps(I, T), the fully conditioned prediction.

The loss is the base model's own denoising loss (`customize.training.sd.batch_loss`), the image latent added
through its UNet-input seam (`unet_inputs` returns {"sample": cat([z_t, c_I])}); the data are the paired image
columns of customize.data (the input image gets the edited image's crop and flip). Only the UNet trains (with
use_ema, through the engine's EMA, whose weights the UNet holds after training and save() writes); VAE and
text encoders are frozen.

Cached per example (with cache_latents, by the shared feature cache): the VAE moments of the edited image and of
the input image (its mode is the mean half of the moments: exactly what encoding now gives) and the text states
of the instruction. A step then runs the UNet only.

The output is a diffusers pipeline folder (StableDiffusionInstructPix2PixPipeline / the SDXL one), written
atomically, which `DiffusionPipeline.from_pretrained` loads.

    accelerate launch recipes/train_instruct_pix2pix.py --pretrained_model_name_or_path tiny-sd \
        --train_data_dir data/edits --output_dir outputs/ip2p --max_train_steps 2000 --use_ema
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from customize.data import ImageCaptionDataset, cache_features, collate_examples
from customize.data.datasets import paired_key
from customize.methods import dreambooth
from customize.methods.lora import cast_frozen_weights
from customize.training import sd
from customize.training.config import PairedDataConfig

ORIGINAL = "original_image"  # the paired (input) image's name in the data set
ORIGINAL_KEY = paired_key(ORIGINAL)  # "original_pixel_values": (B, 3, H, W) in [-1, 1]
CACHED_ORIGINAL = "original_moments"  # the cache's VAE moments of the input image: (B, 2C, h, w)


@dataclass
class InstructPix2PixConfig(PairedDataConfig):
    original_image_column: str = field(default="input_image", metadata={"help": "Column of the input images."})
    edit_prompt_column: str = field(default="edit_prompt", metadata={"help": "Column of the instructions."})
    edited_image_column: str = field(default="edited_image", metadata={"help": "Column of the edited images."})
    conditioning_dropout_prob: float = field(
        default=0.05, metadata={"help": "p: each example drops its text with probability p, its image with p, and "
                                        "both with p (the paper: 0.05), for the two guidance scales; in [0, 1/3]."})
    validation_image: str | None = field(
        default=None, metadata={"help": "Input image of the validation edits (with --validation_prompt, the "
                                        "instruction)."})
    learning_rate: float = 1e-4
    max_train_steps: int = 15000

    RESUME_FREE: ClassVar[frozenset[str]] = PairedDataConfig.RESUME_FREE

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.conditioning_dropout_prob <= 1.0 / 3.0:
            raise ValueError(f"conditioning_dropout_prob must be in [0, 1/3] (text, image and both are dropped with "
                             f"that probability each), got {self.conditioning_dropout_prob}")

    def check_inputs(self) -> None:
        """What a run cannot start without (the dataclass lets it be None so `--help` works)."""
        self.check_data_source("InstructPix2Pix")
        if self.validation_image and not self.validation_prompt:
            raise ValueError("--validation_image needs --validation_prompt (the instruction)")
        if self.validation_image and not Path(self.validation_image).is_file():
            raise FileNotFoundError(f"--validation_image {self.validation_image}: no such file")


# ---------------------------------------------------------------------------------------------------------------
# The model: conv_in widened, the pipeline class of the diffusers InstructPix2Pix pipelines
# ---------------------------------------------------------------------------------------------------------------


def widen_conv_in(unet, extra_channels: int | None = None):
    """conv_in from C to C + extra input channels (extra: the VAE's latent channels, = C for SD), the first C
    input channels' weights and the bias the base model's, the new weights zero, so the widened UNet's output
    equals the base's for any content of the new channels (module docstring). unet.config.in_channels follows,
    so save_pretrained / from_pretrained rebuild the wide layer. A UNet already wide (an InstructPix2Pix model,
    or a resumed run's) is left as it is. Returns the UNet."""
    old = unet.conv_in
    base = unet.config.out_channels  # the latent channels the UNet denoises
    extra = base if extra_channels is None else extra_channels
    if old.in_channels == base + extra:
        return unet
    if old.in_channels != base:
        raise ValueError(f"the UNet's conv_in reads {old.in_channels} channels, neither the {base} of a text-to-image "
                         f"model nor the {base + extra} of an InstructPix2Pix model")
    new = torch.nn.Conv2d(base + extra, old.out_channels, old.kernel_size, old.stride, old.padding,
                          dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                          padding_mode=old.padding_mode).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :base].copy_(old.weight)  # (O, C, k, k) of (O, C + extra, k, k)
        if old.bias is not None:
            new.bias.copy_(old.bias)  # (O,): dropping it would shift every feature map (diffusers#4960)
    unet.conv_in = new
    unet.register_to_config(in_channels=base + extra)
    return unet


def instruct_pipeline(pipe):
    """The diffusers InstructPix2Pix pipeline (StableDiffusionInstructPix2PixPipeline, or the XL one) built from
    `pipe`'s loaded components (no weight is copied). An SDXL pipeline keeps its force_zeros_for_empty_prompt."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline

    from customize.models import is_sdxl

    if isinstance(pipe, (StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline)):
        return pipe
    components = pipe.components
    if is_sdxl(pipe):
        names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
        out = StableDiffusionXLInstructPix2PixPipeline(
            **{k: components[k] for k in names}, force_zeros_for_empty_prompt=force_zeros(pipe),
            add_watermarker=getattr(pipe, "watermark", None) is not None)
    else:
        names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
        out = StableDiffusionInstructPix2PixPipeline(
            **{k: components[k] for k in names}, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    if hasattr(pipe, "_progress_bar_config"):
        out._progress_bar_config = dict(pipe._progress_bar_config)
    return out


def force_zeros(pipe) -> bool:
    """Whether an SDXL pipeline's null text (no negative prompt) is zeros (diffusers' default, True)."""
    return bool(pipe.config.get("force_zeros_for_empty_prompt", True))


def build_model(pipe, cfg: InstructPix2PixConfig | None = None):
    """The pipeline the engine trains: `pipe`'s components with conv_in widened (`widen_conv_in`) in an
    InstructPix2Pix pipeline, the UNet in float32."""
    widen_conv_in(pipe.unet.float())
    return instruct_pipeline(pipe)


def load_instruct_pipeline(path: str, **kwargs):
    """A trained folder (or an InstructPix2Pix hub model) as the diffusers InstructPix2Pix pipeline of its family;
    a plain text-to-image folder is refused (its UNet cannot read an image)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline

    index = Path(path) / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        cls = StableDiffusionXLInstructPix2PixPipeline if "XL" in name else StableDiffusionInstructPix2PixPipeline
        extra = {} if "XL" in name else {"safety_checker": None, "requires_safety_checker": False}
        pipe = cls.from_pretrained(path, **extra, **kwargs)
    else:
        from customize.models import load_pipeline

        pipe = instruct_pipeline(load_pipeline(path, **kwargs))
    check_instruct_unet(pipe, path)
    return pipe


def check_instruct_unet(pipe, name: str = "the model") -> None:
    latent = pipe.vae.config.latent_channels
    if pipe.unet.config.in_channels != 2 * latent:
        raise ValueError(f"{name}: its UNet reads {pipe.unet.config.in_channels} input channels, not the "
                         f"{2 * latent} of an InstructPix2Pix model (latent + input image); train one with "
                         "recipes/train_instruct_pix2pix.py")


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def check_folder(folder, cfg: InstructPix2PixConfig) -> None:
    """Every metadata.jsonl line names an existing input and edited image inside the folder and has the
    instruction: one-line errors naming the line, before datasets' imagefolder reads it."""
    from customize.data.captions import METADATA_FILE, CaptionError, metadata_rows
    from customize.data.images import ImageError

    folder = Path(folder)
    if not (folder / METADATA_FILE).is_file():
        raise CaptionError(f"{folder} has no {METADATA_FILE}: name the triplets there, one line per example with "
                           f'"{cfg.original_image_column}_file_name", "{cfg.edited_image_column}_file_name" and '
                           f'"{cfg.edit_prompt_column}"')
    flags = {cfg.original_image_column: "--original_image_column", cfg.edited_image_column: "--edited_image_column"}
    for lineno, row in metadata_rows(folder):
        where = f"{folder / METADATA_FILE}, line {lineno}"
        for column, flag in flags.items():
            key = "file_name" if column == "image" else f"{column}_file_name"
            if key not in row:
                raise CaptionError(f"{where}: no {key!r} column (it has {sorted(row)}); every example needs it "
                                   f"(or pass {flag})")
            if not row[key].is_file():
                raise ImageError(f"{where}: {key} names {str(row[key].relative_to(folder))!r}, but {row[key]} does "
                                 "not exist; fix the file name or remove the line")
        if cfg.edit_prompt_column not in row:
            raise CaptionError(f"{where}: no {cfg.edit_prompt_column!r} column (it has {sorted(row)}); pass the "
                               "right --edit_prompt_column")
        check_instruction(row[cfg.edit_prompt_column], where)


def check_instruction(text, where: str = "the instruction") -> str:
    if not isinstance(text, str) or not text.strip():
        got = "empty" if isinstance(text, str) else f"a {type(text).__name__}, not text"
        raise ValueError(f"{where}: the instruction is {got}; write what to change, e.g. 'make the shape blue'")
    return text


def build_dataset(pipe, cfg: InstructPix2PixConfig) -> ImageCaptionDataset:
    """(edited image, input image, instruction) examples from the folder or the datasets-library set: the edited
    image is the example's image (the target), the input image its paired image (same crop and flip), the
    instruction its caption. A folder is read by datasets' imagefolder after `check_folder`."""
    from customize.data.datasets import ColumnError
    from customize.models import model_info
    from customize.utils import recover_dir

    if cfg.output_dir:
        recover_dir(cfg.output_dir)
    if cfg.resolution is None:
        cfg.resolution = model_info(pipe).resolution
    sd.check_resolution(pipe, cfg.resolution)
    cfg.check_inputs()
    if cfg.train_data_dir:
        check_folder(cfg.train_data_dir, cfg)
    source = cfg.train_data_dir or cfg.dataset_name
    try:
        ds = ImageCaptionDataset.from_hf(
            source, cfg.resolution, image_column=cfg.edited_image_column, caption_column=cfg.edit_prompt_column,
            split=cfg.dataset_split, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
            paired_columns={ORIGINAL: cfg.original_image_column},
        )
    except ColumnError as e:  # name the ip2p flags, not ControlNet's
        msg = str(e).replace(f"--{ORIGINAL}_column", "--original_image_column")
        msg = msg.replace("--image_column / --caption_column",
                          "--edited_image_column / --edit_prompt_column").replace("--caption_column", "--edit_prompt_column")
        msg = msg.replace("(use --image_column)", "(use --edited_image_column)")
        raise ColumnError(msg) from None
    for i in range(len(ds)):
        check_instruction(ds.prompt(i), f"{source}[{i}]")
    return ds


# ---------------------------------------------------------------------------------------------------------------
# Conditioning: the image latent, the dropout masks, the null conditions
# ---------------------------------------------------------------------------------------------------------------


def image_latents(pipe, batch: dict) -> torch.Tensor:
    """c_I: the VAE posterior's mode of the input image, unscaled (module docstring), (B, C, h, w): the mean half
    of the cached moments, or encoded now."""
    if CACHED_ORIGINAL in batch:
        moments = batch[CACHED_ORIGINAL]
    elif ORIGINAL_KEY in batch:
        with torch.no_grad():
            moments = sd.image_moments(pipe.vae, batch[ORIGINAL_KEY])  # (B, 2C, h, w)
    else:
        raise ValueError("the batch has no input image: build the data set with "
                         "customize.methods.instruct_pix2pix.build_dataset")
    return moments.chunk(2, dim=1)[0]  # the mean = DiagonalGaussianDistribution.mode()


def dropout_masks(rows: int, p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_text, drop_image), two (B,) bool masks from one u ~ U(0, 1) per row: text only for u < p, both for
    p <= u < 2p, image only for 2p <= u < 3p (module docstring), so the three cases are disjoint and each has
    probability p."""
    u = torch.rand(rows, generator=generator)  # (B,)
    return u < 2 * p, (u >= p) & (u < 3 * p)


def null_condition(pipe) -> dict[str, torch.Tensor]:
    """The conditioning the pipeline feeds for "no text": SD, the empty prompt's states (1, L, D); SDXL with
    force_zeros_for_empty_prompt (the default), zeros for the states (1, L, D1 + D2) AND the pooled embedding
    (1, P); SDXL without it, the empty prompt's states and pooled embedding."""
    from customize.models import is_sdxl

    with torch.no_grad():
        empty = {k: v.detach() for k, v in sd.encode_prompts(pipe, [""]).items()}
    if is_sdxl(pipe) and force_zeros(pipe):
        return {k: torch.zeros_like(v) for k, v in empty.items()}
    return empty


def drop_conditions(batch: dict, image: torch.Tensor, null: dict, drop_text: torch.Tensor, drop_image: torch.Tensor
                    ) -> tuple[dict, torch.Tensor]:
    """The batch with the dropped rows' text conditioning (every key of `null` together: SDXL's states and pooled
    embedding) replaced by the null text, and the image latents with the dropped rows zeroed."""
    batch = dict(batch)
    for key, value in null.items():
        where = drop_text.to(batch[key].device).view(-1, *([1] * (batch[key].dim() - 1)))
        batch[key] = torch.where(where, value.to(batch[key].device, batch[key].dtype).expand_as(batch[key]), batch[key])
    keep = (~drop_image).to(image.device, image.dtype).view(-1, 1, 1, 1)
    return batch, image * keep  # (B, C, h, w)


def guided_noise(eps_full: torch.Tensor, eps_image: torch.Tensor, eps_null: torch.Tensor, image_guidance_scale: float,
                 guidance_scale: float) -> torch.Tensor:
    """eps = eps(0, 0) + s_I (eps(I, 0) - eps(0, 0)) + s_T (eps(I, T) - eps(I, 0)): the two-scale guidance of the
    paper (eq. 3) and of both diffusers pipelines; eps(I, T) at s_I = s_T = 1."""
    return (eps_null + image_guidance_scale * (eps_image - eps_null)
            + guidance_scale * (eps_full - eps_image))


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------


class InstructPix2PixMethod:
    """The hooks of customize.training.method; `train(InstructPix2PixMethod(), build_model(pipe, cfg), dataset,
    cfg)`."""

    def __init__(self):
        self.null: dict[str, torch.Tensor] | None = None  # the null text conditioning, (1, L, D) [+ (1, P)]

    def trainable_parameters(self, pipe, cfg: InstructPix2PixConfig):
        """Every UNet weight (conv_in widened by build_model); VAE and text encoders frozen."""
        for module in [pipe.vae, *sd.text_encoders(pipe)]:
            module.requires_grad_(False)
        return list(pipe.unet.requires_grad_(True).parameters())

    def prepare(self, pipe, dataset, cfg: InstructPix2PixConfig, accelerator):
        """The null text conditioning, then with cache_latents the feature cache (VAE moments of both images,
        text states), then the frozen text encoders in the autocast dtype."""
        self.null = null_condition(pipe)
        if cfg.cache_latents:
            dataset = cache_dataset(pipe, dataset, cfg.train_batch_size, cfg.seed)
        cast_frozen_weights(pipe, cfg.mixed_precision)
        return dataset

    collate = staticmethod(collate_examples)

    def loss(self, pipe, batch, cfg: InstructPix2PixConfig):
        return instruct_loss(pipe, batch, cfg, self.null)

    def validate(self, pipe, cfg: InstructPix2PixConfig, step: int):
        return validate(pipe, cfg, step)

    def save(self, pipe, cfg: InstructPix2PixConfig, out_dir):
        return save(pipe, cfg, out_dir)

    def model_card(self, cfg: InstructPix2PixConfig) -> str:
        return model_card(cfg)


def cache_dataset(pipe, dataset, batch_size: int, seed: int):
    """The shared feature cache: per example the VAE moments of the edited image ("latent_moments") and of the
    input image, and the instruction's text states (both flips with random_flip, `customize.data.cache`)."""

    def encode(batch):
        return {
            "latent_moments": sd.image_moments(pipe.vae, batch["pixel_values"]),  # (B, 2C, h, w)
            CACHED_ORIGINAL: sd.image_moments(pipe.vae, batch[ORIGINAL_KEY]),  # (B, 2C, h, w)
            **sd.encode_prompts(pipe, batch["prompt"]),  # (B, L, D) [+ (B, P)]
        }

    return cache_features(dataset, encode, batch_size=batch_size, seed=seed, drop=("pixel_values", ORIGINAL_KEY))


def instruct_loss(pipe, batch: dict, cfg: InstructPix2PixConfig, null: dict | None = None, generator=None):
    """The denoising loss of the edited image's latent with the input image's latent as 4 more UNet input
    channels, after the conditioning dropout (module docstring). The dropout draws one number per row from
    `generator` (None: the global RNG, which the engine seeds and checkpoints)."""
    if "encoder_hidden_states" not in batch:
        with torch.no_grad():
            batch = {**batch, **sd.encode_prompts(pipe, batch["prompt"])}
    image = image_latents(pipe, batch)  # (B, C, h, w)
    if cfg.conditioning_dropout_prob:
        if null is None:
            null = null_condition(pipe)
        drop_text, drop_image = dropout_masks(image.shape[0], cfg.conditioning_dropout_prob, generator)
        batch, image = drop_conditions(batch, image, null, drop_text, drop_image)

    def with_image(x_t, t, cond, time_ids):
        return {"sample": torch.cat([x_t, image.to(x_t.dtype)], dim=1)}  # (B, 2C, h, w)

    return sd.batch_loss(pipe, batch, cfg, generator, unet_inputs=with_image)


def validate(pipe, cfg: InstructPix2PixConfig, step: int) -> list:
    """One strip: the validation image, then num_validation_images edits of it by the validation instruction
    (edit i from seed cfg.seed + i)."""
    from customize.data.images import open_paired_image
    from customize.inference import instruct_edit
    from customize.training.tracking import image_grid

    if not cfg.validation_prompt or not cfg.validation_image:
        return []
    image = open_paired_image(cfg.validation_image, "--validation_image").resize((cfg.resolution, cfg.resolution))
    device = sd.first_parameter(pipe.unet).device
    dtype = dreambooth.AUTOCAST_DTYPES.get(cfg.mixed_precision)
    n = cfg.num_validation_images
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        edits = [instruct_edit(pipe, image, cfg.validation_prompt, cfg.seed + i,
                               num_inference_steps=cfg.validation_inference_steps) for i in range(n)]
    return [image_grid([image, *edits], cols=n + 1)]


def save(pipe, cfg: InstructPix2PixConfig, out_dir) -> Path:
    """The InstructPix2Pix pipeline (`save_pretrained`, model_index.json naming the diffusers InstructPix2Pix
    class) written into out_dir atomically (`atomic_pipeline_dir`: the run's checkpoints and logs carried over)."""
    from customize.utils import atomic_pipeline_dir

    with atomic_pipeline_dir(out_dir) as tmp:
        instruct_pipeline(pipe).save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def model_card(cfg: InstructPix2PixConfig) -> str:
    from customize.training.tracking import model_card_text, run_settings

    data = cfg.train_data_dir or cfg.dataset_name
    settings = {
        "base model": cfg.pretrained_model_name_or_path,
        "data": f"{data} (columns {cfg.original_image_column!r}, {cfg.edit_prompt_column!r}, "
                f"{cfg.edited_image_column!r})",
        "conditioning dropout": f"{cfg.conditioning_dropout_prob} each (text, image, both)",
        "EMA": f"decay {cfg.ema_decay}" if cfg.use_ema else "off",
        **run_settings(cfg),
        "learning rate": f"{cfg.learning_rate} ({cfg.lr_scheduler}, warmup {cfg.lr_warmup_steps})",
    }
    return model_card_text(
        f"InstructPix2Pix: {Path(cfg.output_dir).resolve().name}",
        f"An InstructPix2Pix model trained with `customize` from `{cfg.pretrained_model_name_or_path}`. Load it "
        "with `DiffusionPipeline.from_pretrained(<this folder>)` and call it with `image=` and the instruction as "
        "the prompt (`image_guidance_scale` 1.5, `guidance_scale` 7.5 to start), or "
        "`customize.inference.instruct_edit`.",
        settings,
    )
