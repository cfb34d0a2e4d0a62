"""The Stable Diffusion side of training: prompts -> conditioning, images -> latents, one UNet call per batch.

Everything here reproduces what the diffusers pipelines do at inference (`StableDiffusionPipeline.encode_prompt`,
`StableDiffusionXLPipeline.encode_prompt` / `_get_add_time_ids`, `vae.encode(...).latent_dist`), so a model
trained with these functions is conditioned exactly as the pipeline will condition it later.

Conditioning is a dict:
  SD 1.x/2.x: {"encoder_hidden_states": (B, L, D)}                 last hidden state of the CLIP text encoder
  SDXL:       {"encoder_hidden_states": (B, L, D1 + D2),            penultimate hidden states of both encoders
               "text_embeds": (B, P)}                                pooled, projected output of text_encoder_2
SDXL also needs "time_ids" (B, 6) = (original_size, crop_top_left, target_size) per example, in (h, w) order.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from customize.models import is_sdxl, vae_scale_factor
from customize.core.losses import diffusion_loss


def first_parameter(module: torch.nn.Module) -> torch.Tensor:
    """Where a module lives and in which dtype, in O(1): diffusers' `.device` / `.dtype` walk every submodule
    (looking for offload hooks), which costs milliseconds per call on a full UNet, too much for every step."""
    return next(module.parameters())


def tokenizers(pipe) -> list:
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


def text_encoders(pipe) -> list[torch.nn.Module]:
    return [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t is not None]


def tokenize(pipe, prompts: Sequence[str]) -> list[torch.Tensor]:
    """One (B, L) id tensor per tokenizer, padded to the tokenizer's model_max_length and truncated like the pipeline
    (a caption cut there is reported once, `warn_truncated`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    toks = tokenizers(pipe)
    warn_truncated(toks[0], prompts)
    return [
        tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        for tok in toks
    ]


logger = logging.getLogger(__name__)
# What warn_truncated has seen in this process: the prompts already measured, and whether it has warned.
_TRUNCATION = {"checked": set(), "warned": False}
_MAX_CHECKED = 100_000


def warn_truncated(tokenizer, prompts: Sequence[str]) -> int:
    """Warn once per run (process) when prompts are longer than the text encoder reads (CLIP: 77 tokens with the
    start and end tokens): they are cut there, and the words past it never reach the model. Each distinct prompt
    is measured once. Returns how many of `prompts` are cut."""
    state, limit = _TRUNCATION, tokenizer.model_max_length
    new = [p for p in dict.fromkeys(prompts) if p not in state["checked"]]
    if state["warned"] or not new:
        return 0
    if len(state["checked"]) < _MAX_CHECKED:
        state["checked"].update(new)
    lengths = [len(ids) for ids in tokenizer(new, truncation=False, verbose=False).input_ids]
    cut = [(p, n) for p, n in zip(new, lengths) if n > limit]
    if cut:
        state["warned"] = True
        first, n = cut[0]
        first = first if len(first) <= 100 else first[:97] + "..."
        logger.warning("%d of %d caption(s) of this batch are longer than the text encoder's %d tokens and are cut "
                       "there (the words after it are not trained on), e.g. %r (%d tokens); shorten them. (Shown "
                       "once per run.)", len(cut), len(new), limit, first, n)
    return len(cut)


def encode_tokens(pipe, input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Token ids (one tensor per tokenizer) -> conditioning dict (module docstring). Not under no_grad: with
    `train_text_encoder` the gradient flows back into the encoders; a latent/text cache wraps it in no_grad."""
    encoders = text_encoders(pipe)
    if len(input_ids) != len(encoders):
        raise ValueError(f"got {len(input_ids)} token tensors for {len(encoders)} text encoders")
    if not is_sdxl(pipe):
        (te,), (ids,) = encoders, input_ids
        return {"encoder_hidden_states": te(ids.to(first_parameter(te).device), return_dict=False)[0]}  # (B, L, D)
    hidden, pooled = [], None
    for te, ids in zip(encoders, input_ids):
        out = te(ids.to(first_parameter(te).device), output_hidden_states=True, return_dict=True)
        # SDXL conditions on the penultimate layer (clip_skip None in the pipeline) of both encoders.
        hidden.append(out.hidden_states[-2])  # (B, L, D_i)
        if getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds  # (B, P) from CLIPTextModelWithProjection (text_encoder_2)
    if pooled is None:
        raise ValueError("SDXL needs a text encoder with a projection (CLIPTextModelWithProjection) for pooled embeddings")
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}  # (B, L, D1+D2), (B, P)


def encode_prompts(pipe, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    return encode_tokens(pipe, tokenize(pipe, prompts))


def time_ids(original_size, crop_top_left, target_size, device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL micro-conditioning (Podell et al., 2023, sec. 2.2): per example the 6 numbers
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w); each argument is (B, 2) or one (h, w) pair."""
    parts = [torch.as_tensor(x, dtype=torch.float64).reshape(-1, 2) for x in (original_size, crop_top_left, target_size)]
    batch = max(p.shape[0] for p in parts)
    ids = torch.cat([p.expand(batch, 2) for p in parts], dim=1)  # (B, 6)
    return ids.to(device=device, dtype=dtype)


def check_resolution(pipe, resolution: int) -> None:
    """Refuse an image size the VAE cannot encode to a whole latent grid, before any work or file is made."""
    from customize.models import model_info

    factor = vae_scale_factor(pipe.vae)
    if resolution <= 0 or resolution % factor:
        nearest = sorted({max(factor, resolution // factor * factor), max(factor, (resolution // factor + 1) * factor)})
        raise ValueError(
            f"resolution {resolution} is not a positive multiple of the VAE downsampling factor {factor}; use "
            f"{' or '.join(map(str, nearest))} (this model's native size is {model_info(pipe).resolution})"
        )


def image_moments(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """q(z | x) of the VAE encoder as its (mean, logvar) moments, (B, 2C, h, w): what a latent cache stores, so that
    a cached run samples latents from the same distribution as an uncached one."""
    w = first_parameter(vae)
    return vae.encode(pixel_values.to(device=w.device, dtype=w.dtype)).latent_dist.parameters  # (B, 2C, h, w)


def latents_from_moments(vae, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ q(z | x), then the SD latent normalisation z' = (z - shift_factor) * scaling_factor."""
    # imported here: diffusers' model modules take seconds to import, and a recipe refuses bad options before
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(moments).sample(generator)  # (B, C, h, w)
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def encode_images(vae, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, H/f, W/f)."""
    return latents_from_moments(vae, image_moments(vae, pixel_values), generator)


def unet_predict(unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict, time_ids: torch.Tensor | None = None,
                 **unet_kwargs):
    """The UNet call of the pipelines: cross-attention on the text states, plus SDXL's added conditioning.
    `unet_kwargs` go to the UNet unchanged (ControlNet's down_block_additional_residuals and
    mid_block_additional_residual, cross_attention_kwargs, ...)."""
    added = sdxl_added_conditioning(cond, time_ids, noisy_latents.shape[0])
    return unet(
        noisy_latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added,
        return_dict=False, **unet_kwargs,
    )[0]  # (B, C, h, w)


def sdxl_added_conditioning(cond: dict, time_ids: torch.Tensor | None, batch: int) -> dict | None:
    """SDXL's `added_cond_kwargs` ({"text_embeds": (B, P), "time_ids": (B, 6)}) of a conditioning dict, None for SD
    1.x/2.x: what the UNet and an SDXL ControlNet both take."""
    if "text_embeds" not in cond:
        return None
    if time_ids is None:
        raise ValueError("SDXL conditioning needs time_ids (original_size, crop_top_left, target_size)")
    # one (1, 6) row serves a whole batch, as in the pipeline
    return {"text_embeds": cond["text_embeds"], "time_ids": time_ids.expand(batch, -1)}


# A method's extra UNet inputs (`batch_loss(..., unet_inputs=fn)`): fn(x_t, t, cond, time_ids) -> dict, called
# once per loss with the noised latents x_t (B, C, h, w), the timesteps t (B,), the conditioning dict and the SDXL
# time_ids (or None). The dict's "sample", when present, replaces x_t as the UNet's input (InstructPix2Pix:
# cat([x_t, image latents], dim=1), more input channels); every other entry is passed to the UNet as a keyword
# (ControlNet: down_block_additional_residuals, mid_block_additional_residual).
UNetInputs = Callable[[torch.Tensor, torch.Tensor, dict, "torch.Tensor | None"], dict]


def predict_with(unet, cond: dict, time_ids: torch.Tensor | None, unet_inputs: UNetInputs | None = None):
    """predict(x_t, t) for `diffusion_loss`: the UNet with its conditioning bound, plus a method's extra inputs."""

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        extra = dict(unet_inputs(x_t, t, cond, time_ids)) if unet_inputs is not None else {}
        sample = extra.pop("sample", x_t)
        return unet_predict(unet, sample, t, cond, time_ids, **extra)

    return predict


def batch_latents(pipe, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """The scaled latents of a batch of `customize.data.collate_examples` (on the training device): drawn from the
    feature cache's VAE moments ("latent_moments") or encoded now from "pixel_values". (B, C, h, w)."""
    vae = pipe.vae
    if "latent_moments" in batch:
        return latents_from_moments(vae, batch["latent_moments"], generator)
    with torch.no_grad():
        return encode_images(vae, batch["pixel_values"], generator)


def batch_conditioning(pipe, batch: dict, latents: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """(conditioning dict, SDXL time_ids or None) of a batch: from the cache ("encoder_hidden_states"
    [+ "text_embeds"]) or encoded now, the path taken whenever a text encoder trains, from token ids a collate
    made ("input_ids": one (B, L) tensor per tokenizer) or else from "prompt"."""
    if "encoder_hidden_states" in batch:
        cond = {k: batch[k] for k in ("encoder_hidden_states", "text_embeds") if k in batch}
    elif "input_ids" in batch:
        cond = encode_tokens(pipe, batch["input_ids"])
    else:
        cond = encode_prompts(pipe, batch["prompt"])
    ids = None
    if "text_embeds" in cond:
        ids = time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"], latents.device, latents.dtype)
    return cond, ids


def batch_loss(pipe, batch: dict, cfg, generator: torch.Generator | None = None,
               unet_inputs: UNetInputs | None = None) -> dict[str, torch.Tensor]:
    """The DreamBooth / LoRA / fine-tune loss of one batch of `customize.data.collate_examples`, already on the
    training device (the engine sends it there): latents and conditioning as `batch_latents` /
    `batch_conditioning` make them; the last batch["num_prior"] rows are class images.

    `unet_inputs` is where a method adds UNet inputs without copying this loss (see `UNetInputs`): ControlNet's
    residuals, InstructPix2Pix's extra input channels. The same noise, timesteps and target either way."""
    latents = batch_latents(pipe, batch, generator)  # (B, C, h, w)
    cond, ids = batch_conditioning(pipe, batch, latents)
    num_prior = int(batch.get("num_prior", 0))
    return diffusion_loss(
        training_scheduler(pipe),
        latents,
        predict_with(pipe.unet, cond, ids, unet_inputs),
        noise_offset=cfg.noise_offset,
        snr_gamma=cfg.snr_gamma,
        num_prior=num_prior,
        # only a config with class images (DreamBooth's) has the weight; it is never read without class rows
        prior_loss_weight=cfg.prior_loss_weight if num_prior else 0.0,
        generator=generator,
        # a config without the field (DreamBooth's, LoRA's) samples t uniformly
        timestep_sampling=getattr(cfg, "timestep_sampling", "uniform"),
    )


def training_scheduler(pipe):
    """The pipeline's scheduler when it exposes the DDPM forward process (DDPM, DDIM, PNDM, DPM-Solver do);
    otherwise a DDPMScheduler built from the same config (same betas, same prediction type)."""
    sched = pipe.scheduler
    if all(hasattr(sched, a) for a in ("alphas_cumprod", "add_noise", "get_velocity")):
        return sched
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sched.config)
