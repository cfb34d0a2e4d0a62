"""The toy base model: a Stable Diffusion 1.x-format pipeline trained from scratch on the toy world.

Two methods for the shared engine (`customize.training.train`), run one after the other by
`recipes/train_toy_base.py`:

1. `VAEStage` trains an AutoencoderKL (Kingma & Welling; SD's first stage) on world scenes and generic clutter:
       L = E_x [ mean |x - D(z)| + kl_weight * KL(q(z|x) || N(0, I)) / dim(z) ],  z ~ q(z|x) = N(mu(x), sigma(x)^2)
   then sets `scaling_factor` = 1 / std(z) over world scenes, so the diffusion model sees unit-variance latents
   (SD's 0.18215 was measured the same way).
2. `TextUNetStage` trains the CLIP text encoder and the UNet2DConditionModel jointly on cached latents with the
   shared denoising loss (`customize.training.sd.batch_loss`: Ho et al.'s L_simple, optional min-SNR weighting),
   dropping captions at `caption_dropout` so classifier-free guidance works, and saves the whole pipeline with
   the shared pipeline writer (`customize.utils.atomic_pipeline_dir`). A token-grounding loss on the cross-attention
   maps (`customize.toy.grounding`, `grounding_loss_weight` 0.5) teaches it to look for each word where it is
   drawn, as Stable Diffusion's own maps do; without it a DreamBooth subject cannot be moved to new backgrounds.
   The position words ("top", "left", "center", ...) are grounded to the shape too, at every noise level
   (`ground_position`): the layout is chosen at t = T, and without it the base ignores them.

The models are small on purpose (about 5 MB of fp32 weights in all): 32x32 images, a 2x VAE (16x16x4 latents),
a 64-wide 3-layer text encoder, a (16, 32, 64) UNet with cross-attention at 8x8 and 4x4. The scheduler is SD's
scaled_linear betas rescaled to zero terminal SNR, with v-prediction (as SD 2.x) and trailing DDIM timesteps; see
SCHEDULER_CONFIG for why.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from customize.data.datasets import collate_examples
from customize.data.transforms import pil_to_tensor
from customize.toy import world
from customize.toy.tokenizer import toy_tokenizer
from customize.training import TrainConfig, sd
from customize.training.config import check_learning_rate
from customize.utils import atomic_path

# Architectures (diffusers / transformers constructor arguments).
# A 2x VAE: 16x16x4 latents. A 4x one (8x8 latents) trains slower for the same time on a CPU and rounds the
# squares' corners, which the UNet then cannot recover.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    sample_size=world.IMAGE_SIZE,
)
# Cross-attention at 8x8 and 4x4, where the layout and colours are decided; none at 16x16, where 256 tokens
# would cost a third of the step (and localised words no better:
# docs/findings.md, 'Removed base-training variants').
UNET_CONFIG = dict(
    in_channels=4, out_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(1, 4, 4),  # diffusers' name for the number of heads per level
    norm_num_groups=8,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu")
# Stable Diffusion 1.x's noise schedule (scaled_linear betas 0.00085..0.012, 1000 steps;
# docs/methods.md, 'Beta schedules'), rescaled to zero terminal SNR, with v-prediction and trailing DDIM timesteps
# (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"). SD's own schedule leaves
# sqrt(alpha_bar_T) = 0.068 of the image in x_T; on 16x16 latents of flat colours that leak (the latent mean) is as
# large as the noise's own mean (std 1/16), so a model trained on it takes the background colour from the starting
# noise instead of the prompt. Measured here after 1000 steps of stage 2 (96 held-out captions): background 96% with
# the rescaled schedule, 12% (chance: 17%) with SD's schedule at beta_end 0.02, and no better at 0.012.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
SCHEDULER_CONFIG = dict(SD_SCHEDULER_CONFIG, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                        timestep_spacing="trailing")


@dataclass
class ToyBaseConfig(TrainConfig):
    """Both stages' settings; the shared fields (seed, batch size, precision, checkpoints, ...) apply to each."""

    output_dir: str = field(default="outputs/toy_base", metadata={"help": "Run folder (checkpoints and logs of both stages)."})
    pipeline_dir: str | None = field(
        default=None, metadata={"help": "Where the trained pipeline is saved; default <output_dir>/pipeline."}
    )
    data_seed: int = field(default=0, metadata={"help": "Seed of the world examples (scenes, captions, clutter)."})
    num_train_images: int = field(default=20000, metadata={"help": "World examples per stage (clutter included for the VAE)."})
    clutter_fraction: float = field(default=0.5, metadata={"help": "Share of generic clutter images in the VAE data."})
    vae_train_steps: int = field(default=1500, metadata={"help": "Optimizer steps of stage 1 (the VAE)."})
    vae_learning_rate: float = field(default=2e-3, metadata={"help": "Learning rate of the VAE (> 0)."})
    vae_batch_size: int = field(default=32, metadata={"help": "Examples per VAE micro-batch."})
    vae_crop_size: int | None = field(default=16, metadata={"help": "Train the VAE on random crops of this size (None: whole images)."})
    kl_weight: float = field(default=1e-4, metadata={"help": "Weight of the per-element KL term of the VAE loss."})
    unet_train_steps: int = field(default=5500, metadata={"help": "Optimizer steps of stage 2 (text encoder + UNet)."})
    unet_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the UNet (> 0)."})
    text_encoder_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate (> 0) of the text encoder; unset: unet_learning_rate."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Share of empty captions (for classifier-free guidance)."})
    grounding_loss_weight: float = field(default=0.5, metadata={
        "help": "Weight of the token-grounding loss (customize.toy.grounding): each caption word's cross-attention "
                "is pulled into the region it names (the shape's words onto the shape's mask, the background's "
                "onto the rest), so the base localises words as Stable Diffusion does. Without it (0) the base reads "
                "its prompt as one pooled vector and a DreamBooth-LoRA binds the subject to its backgrounds."})
    ground_position: bool = field(default=True, metadata={
        "help": "Also ground the position words (\"top\", \"left\", \"center\", ...) to the shape's mask, and ask "
                "for it at every noise level in captions that name a position (the layout is chosen from them at "
                "t = T, where the other words' grounding is weighted 0)."})
    ground_every_timestep: bool = field(default=False, metadata={
        "help": "Weight every caption's grounding loss by 1 at every noise level (default: sqrt(alpha_bar_t), 0 at "
                "t = T, except captions naming a position under ground_position)."})
    snr_gamma: float | None = field(default=None, metadata={
        "help": "min-SNR-gamma weighting of the denoising loss (unset: none; with it the t = T steps, where the "
                "layout is chosen, weigh almost nothing)."})
    noise_offset: float = field(default=0.0, metadata={"help": "Noise offset scale (helps flat, saturated colours)."})
    zero_terminal_snr: bool = field(default=True, metadata={
        "help": "SD's betas rescaled to zero terminal SNR, v-prediction, trailing timesteps (Lin et al. 2024); "
                "false: SD 1.x's epsilon schedule as is (the background colour then follows the noise, not the prompt)."})
    validation_guidance: float = field(default=3.0, metadata={"help": "Classifier-free guidance of the validation images."})
    validation_inference_steps: int = field(default=25, metadata={"help": "DDIM steps of each validation image."})
    train_batch_size: int = 64
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    adam_weight_decay: float = 0.0
    checkpointing_steps: int = 1000
    checkpoints_total_limit: int | None = 1
    report_to: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.clutter_fraction < 1.0:
            raise ValueError(f"clutter_fraction must be in [0, 1), got {self.clutter_fraction}")
        if self.grounding_loss_weight < 0:
            raise ValueError(f"grounding_loss_weight must be >= 0, got {self.grounding_loss_weight}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        check_learning_rate("vae_learning_rate", self.vae_learning_rate)
        check_learning_rate("unet_learning_rate", self.unet_learning_rate)
        check_learning_rate("text_encoder_learning_rate", self.text_encoder_learning_rate,
                            unset="the same as unet_learning_rate")
        if self.snr_gamma is not None and self.snr_gamma < 0:
            raise ValueError(f"snr_gamma must be >= 0 (0 or unset: no weighting), got {self.snr_gamma}")


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


class ToyImages(Dataset):
    """World training examples {"pixel_values": (3, H, W) in [-1, 1], "text": caption}, example i a pure
    function of (seed, i). With `clutter_fraction`, that share of the examples are generic clutter images with
    an empty caption (VAE data only). With `crop_size`, a random crop of that size (drawn from python's
    `random`, which the engine seeds per example): the VAE is convolutional, and a 16-px crop costs a quarter of
    a whole image, so the VAE gets four times the optimizer steps for the same time. With `masks`, each example
    also has "shape_mask": (H, W), the share of each pixel the shape covers (for the grounding loss)."""

    def __init__(self, n: int, seed: int = 0, split: str = "train", clutter_fraction: float = 0.0,
                 crop_size: int | None = None, masks: bool = False):
        if crop_size is not None and not 0 < crop_size <= world.IMAGE_SIZE:
            raise ValueError(f"crop_size must be in (0, {world.IMAGE_SIZE}], got {crop_size}")
        self.n, self.seed, self.split, self.clutter_fraction, self.crop_size = n, seed, split, clutter_fraction, crop_size
        self.masks = masks
        if masks and (clutter_fraction or crop_size):
            raise ValueError("shape masks are for whole single-shape scenes (no clutter or crops)")

    def __len__(self) -> int:
        return self.n

    def is_clutter(self, i: int) -> bool:
        return bool(world.scene_rng(self.seed, i, "clutter?").random() < self.clutter_fraction)

    def __getitem__(self, i: int) -> dict:
        if self.is_clutter(i):
            pixels, text = pil_to_tensor(world.to_image(world.clutter_array(self.seed, i))), ""
        else:
            scene, text = world.base_example(self.seed, i, self.split)
            pixels = pil_to_tensor(world.render(scene))  # (3, H, W)
            if self.masks:
                return {"pixel_values": pixels, "text": text, "shape_mask": torch.from_numpy(world.coverage(scene))}
        if self.crop_size is not None:
            top, left = (random.randrange(world.IMAGE_SIZE - self.crop_size + 1) for _ in range(2))
            pixels = pixels[:, top:top + self.crop_size, left:left + self.crop_size]  # (3, crop, crop)
        return {"pixel_values": pixels, "text": text}


class CaptionDropout(Dataset):
    """Replace an example's caption by "" with probability p, drawn per access (the engine seeds each access),
    so the model also learns the unconditional prediction that classifier-free guidance needs."""

    def __init__(self, dataset, p: float):
        self.dataset, self.p = dataset, p

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        ex = dict(self.dataset[i])
        if random.random() < self.p:
            ex["text"] = ""
        return ex


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def new_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def new_pipeline(vae, tokenizer=None, seed: int = 0, zero_terminal_snr: bool = True):
    """A StableDiffusionPipeline around a trained `vae`: a fresh text encoder and UNet sized for its latents,
    the toy tokenizer, a DDIM scheduler (SCHEDULER_CONFIG, or SD's own with `zero_terminal_snr=False`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from customize.models import vae_scale_factor

    tokenizer = tokenizer or toy_tokenizer()
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_cfg)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=vae.config.sample_size // vae_scale_factor(vae), cross_attention_dim=text_cfg.hidden_size,
        **UNET_CONFIG,
    )
    scheduler = DDIMScheduler(**(SCHEDULER_CONFIG if zero_terminal_snr else SD_SCHEDULER_CONFIG))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@torch.no_grad()
def latent_std(vae, n: int = 512, seed: int = 0) -> float:
    """std of z ~ q(z | x) over `n` world scenes (the quantity SD's scaling_factor normalises)."""
    x = torch.stack([ToyImages(n, seed, "all")[i]["pixel_values"] for i in range(n)])  # (n, 3, H, W)
    g = torch.Generator().manual_seed(seed)
    z = torch.cat([vae.encode(b.to(vae.device)).latent_dist.sample(g.manual_seed(seed + k)).cpu()
                   for k, b in enumerate(x.split(128))])  # (n, C, h, w)
    return float(z.std())


def write_clip_vocab_files(tokenizer, folder: str | Path) -> None:
    """Also write vocab.json and merges.txt beside tokenizer.json, so the slow CLIPTokenizer of older
    transformers releases loads the folder too."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    folder = Path(folder)
    with atomic_path(folder / "vocab.json") as tmp:
        tmp.write_text(json.dumps(model["vocab"], ensure_ascii=False))
    with atomic_path(folder / "merges.txt") as tmp:
        tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: the VAE
# ---------------------------------------------------------------------------------------------------------------


class VAEStage:
    """Engine method for the AutoencoderKL. The model is the VAE itself."""

    def trainable_parameters(self, vae, cfg: ToyBaseConfig):
        vae.requires_grad_(True)
        return list(vae.parameters())

    def loss(self, vae, batch, cfg: ToyBaseConfig):
        x = batch["pixel_values"].to(vae.device, vae.dtype)  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample  # (B, 3, H, W)
        rec = (recon.float() - x.float()).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element: independent of the latent size
        return {"loss": rec + cfg.kl_weight * kl, "reconstruction": rec.detach(), "kl": kl.detach()}

    def collate(self, examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}  # (B, 3, H, W)

    def validate(self, vae, cfg: ToyBaseConfig, step: int):
        x = torch.stack([ToyImages(8, cfg.data_seed + 1, "all", cfg.clutter_fraction)[i]["pixel_values"] for i in range(8)])
        recon = vae.decode(vae.encode(x.to(vae.device)).latent_dist.mode()).sample.cpu()
        from customize.data.transforms import tensor_to_pil

        return [tensor_to_pil(t) for t in torch.cat([x, recon])]

    def save(self, vae, cfg: ToyBaseConfig, out_dir):
        """Set scaling_factor from the trained encoder, then save the VAE folder."""
        vae.register_to_config(scaling_factor=1.0 / latent_std(vae, seed=cfg.data_seed))
        from customize.utils import atomic_dir

        with atomic_dir(Path(out_dir) / "vae") as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: text encoder + UNet
# ---------------------------------------------------------------------------------------------------------------


def grounding_weights(cfg: ToyBaseConfig, alpha_bar: torch.Tensor, names_position: torch.Tensor | None) -> torch.Tensor:
    """Per example, the weight of the token-grounding loss at its timestep: sqrt(alpha_bar_t), the share of the
    image left in x_t (0 at t = T, where no layout is visible); 1 for captions naming a position under
    `ground_position` (a named position is asked for at every t: it is what fixes the layout at t = T); 1 for
    every caption under `ground_every_timestep`."""
    if cfg.ground_every_timestep:
        return torch.ones_like(alpha_bar)
    weights = alpha_bar.sqrt()
    if cfg.ground_position:
        weights = torch.where(names_position.to(weights.device), torch.ones_like(weights), weights)
    return weights


class TextUNetStage:
    """Engine method for the text encoder and UNet of a pipeline whose VAE is trained and frozen."""

    def __init__(self, tokenizer, pipeline_dir: str | Path, ground_position: bool | None = None):
        # ground_position: whether collate marks the position words and the captions naming one; unset, the
        # config's (taken in prepare; collate before that marks none)
        self.tokenizer, self.pipeline_dir, self.ground_position = tokenizer, Path(pipeline_dir), ground_position
        self.attention: dict[str, list[torch.Tensor]] = {}  # cross-attention maps of the current step (grounding)
        self.timesteps: torch.Tensor | None = None
        self._processors = self._timestep_hook = None  # what prepare installs for the grounding loss

    def trainable_parameters(self, pipe, cfg: ToyBaseConfig):
        pipe.vae.requires_grad_(False).eval()
        pipe.unet.requires_grad_(True)
        pipe.text_encoder.requires_grad_(True)
        return [
            {"params": list(pipe.unet.parameters()), "lr": cfg.learning_rate},
            {"params": list(pipe.text_encoder.parameters()),
             "lr": cfg.learning_rate if cfg.text_encoder_learning_rate is None else cfg.text_encoder_learning_rate},
        ]

    def prepare(self, pipe, dataset, cfg: ToyBaseConfig, accelerator):
        """Encode every image once with the frozen VAE (its posterior moments, so each step still samples z),
        then drop captions per access."""
        if self.ground_position is None:
            self.ground_position = cfg.ground_position
        elif self.ground_position != cfg.ground_position:
            raise ValueError(f"TextUNetStage(ground_position={self.ground_position}) trains a config with "
                             f"ground_position={cfg.ground_position}: the batches and the loss would disagree")
        if cfg.cache_latents:
            from customize.data.cache import cache_features

            vae = pipe.vae
            dataset = cache_features(
                dataset, lambda b: {"latent_moments": sd.image_moments(vae, b["pixel_values"])},
                batch_size=256, seed=cfg.data_seed, collate=collate_examples,
            )
        if cfg.grounding_loss_weight:
            from customize.toy.grounding import record_cross_attention

            self._processors = record_cross_attention(pipe.unet, self.attention)
            self._timestep_hook = pipe.unet.register_forward_pre_hook(self._keep_timesteps)
        return CaptionDropout(dataset, cfg.caption_dropout)

    def _keep_timesteps(self, unet, args):
        self.timesteps = args[1]

    def collate(self, examples):
        batch = collate_examples(examples)
        texts = batch.pop("text")
        batch["input_ids"] = [self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids]  # one (B, L) tensor per tokenizer, as sd.encode_tokens takes them
        if "shape_mask" in batch:
            from customize.toy.grounding import word_regions

            length = self.tokenizer.model_max_length
            batch["token_regions"] = torch.stack([word_regions(t, length, self.ground_position) for t in texts])  # (B, L)
            if self.ground_position:
                batch["names_position"] = torch.tensor([world.parse_caption(t)["position"] is not None for t in texts])
        return batch

    def loss(self, pipe, batch, cfg: ToyBaseConfig):
        if not cfg.grounding_loss_weight:
            return sd.batch_loss(pipe, batch, cfg)
        from customize.toy.grounding import grounding_loss

        self.attention.clear()
        out = sd.batch_loss(pipe, batch, cfg)
        scheduler = sd.training_scheduler(pipe)
        alpha_bar = scheduler.alphas_cumprod.to(self.timesteps.device)[self.timesteps]  # (B,)
        probs = [maps[-1] for maps in self.attention.values()]  # (B, N, L) per cross-attention layer
        weights = grounding_weights(cfg, alpha_bar, batch.get("names_position"))
        ground = grounding_loss(probs, batch["shape_mask"], batch["token_regions"], weights)
        self.attention.clear()
        return {**out, "loss": out["loss"] + cfg.grounding_loss_weight * ground, "grounding": ground.detach()}

    def validate(self, pipe, cfg: ToyBaseConfig, step: int):
        from customize.toy.quality import sample

        prompts = [p for p, _ in world.heldout_prompts(8, seed=cfg.data_seed)]
        return sample(pipe, prompts, guidance_scale=cfg.validation_guidance,
                      num_inference_steps=cfg.validation_inference_steps)

    def save(self, pipe, cfg: ToyBaseConfig, out_dir):
        """The pipeline, CLIP vocab files for old transformers, and a model card, into `pipeline_dir` (`out_dir`
        keeps the run's checkpoints and logs), all written beside it and swapped in whole by the shared pipeline
        writer (`customize.utils.atomic_pipeline_dir`)."""
        from customize.training.tracking import write_model_card
        from customize.utils import atomic_pipeline_dir

        if self._processors is not None:  # the recorders and the hook out, the UNet's own processors back
            pipe.unet.set_attn_processor(self._processors)
            self._timestep_hook.remove()
        with atomic_pipeline_dir(self.pipeline_dir) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            write_clip_vocab_files(pipe.tokenizer, tmp / "tokenizer")
            write_model_card(MODEL_CARD.format(
                vae_steps=cfg.vae_train_steps, unet_steps=cfg.unet_train_steps, batch=cfg.train_batch_size,
                n=cfg.num_train_images, held=len(world.HELD_OUT_COMBOS), subject=world.SUBJECT, style=world.STYLE,
                dropout=round(100 * cfg.caption_dropout),
                grounding=(f", token-grounding loss on the cross-attention maps at weight {cfg.grounding_loss_weight:g}"
                           + (" (position words included, at every noise level)" if cfg.ground_position else "")
                           if cfg.grounding_loss_weight else ""),
            ), tmp)


MODEL_CARD = """# Toy base model (customize)

A Stable Diffusion-format pipeline (VAE, CLIP text encoder, CLIP tokenizer, UNet, DDIM scheduler) trained from
scratch on the procedural toy world of `customize.toy.world` by `recipes/train_toy_base.py`: 32x32 images of one
flat shape (circle, square, triangle; six colours; two sizes; five positions) on a flat background.

- Scheduler: SD 1.x's scaled_linear betas rescaled to zero terminal SNR, v-prediction (as SD 2.x), trailing
  DDIM timesteps.
- VAE: {vae_steps} steps on world scenes and generic clutter; text encoder + UNet: {unet_steps} steps of batch
  {batch} on {n} captioned scenes (latents cached, {dropout}% empty captions for classifier-free guidance){grounding}.
- Never shown to the text encoder or UNet: the subject ({subject.colour} {subject.shape}, identifier
  "{subject.identifier}", class word "{subject.class_word}"), the style ({style.name}, identifier
  "{style.identifier}"), and {held} held-out (colour, shape, background) combinations.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("data/toy/base")
image = pipe("a large red circle on a blue background", guidance_scale=3.0, num_inference_steps=25).images[0]
```
"""


# ---------------------------------------------------------------------------------------------------------------
# Both stages
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ToyBaseResult:
    pipeline_dir: str
    seconds: dict[str, float]  # wall time per stage and in total
    final_loss: dict[str, float]


def train_toy_base(cfg: ToyBaseConfig) -> ToyBaseResult:
    """Stage 1 (VAE) then stage 2 (text encoder + UNet), each a `customize.training.train` run in its own
    sub-folder of `output_dir` (so each resumes from its own checkpoints); a finished stage 1 is reused."""
    import time
    from dataclasses import replace

    from diffusers import AutoencoderKL

    from customize.training import train
    from customize.utils import recover_dir, seed_everything

    out = Path(cfg.output_dir)
    pipeline_dir = Path(cfg.pipeline_dir or out / "pipeline")
    recover_dir(pipeline_dir)  # what a run killed while saving it left
    seconds, final = {}, {}
    start = time.perf_counter()
    seed_everything(cfg.seed)

    vae_run = out / "stage1-vae"
    if (vae_run / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(vae_run / "vae")
    else:
        vae = new_vae(cfg.seed)
        vae_cfg = replace(cfg, output_dir=str(vae_run), max_train_steps=cfg.vae_train_steps,
                          learning_rate=cfg.vae_learning_rate, train_batch_size=cfg.vae_batch_size)
        data = ToyImages(cfg.num_train_images, cfg.data_seed, "train", cfg.clutter_fraction, cfg.vae_crop_size)
        final["vae"] = train(VAEStage(), vae, data, vae_cfg).losses[-1]
    vae.requires_grad_(False).eval()
    seconds["vae"] = time.perf_counter() - start

    tokenizer = toy_tokenizer(seed=cfg.data_seed)
    pipe = new_pipeline(vae, tokenizer, cfg.seed, cfg.zero_terminal_snr)
    unet_cfg = replace(cfg, output_dir=str(out / "stage2-unet"), max_train_steps=cfg.unet_train_steps,
                       learning_rate=cfg.unet_learning_rate)
    data = ToyImages(cfg.num_train_images, cfg.data_seed, masks=bool(cfg.grounding_loss_weight))
    result = train(TextUNetStage(tokenizer, pipeline_dir, cfg.ground_position), pipe, data, unet_cfg)
    final["unet"] = result.losses[-1]
    seconds["total"] = time.perf_counter() - start
    seconds["unet"] = seconds["total"] - seconds["vae"]
    return ToyBaseResult(str(pipeline_dir), seconds, final)
