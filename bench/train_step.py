"""LoRA DreamBooth and ControlNet training steps: the toolkit against a diffusers-example loop, measured in the
same run.

    python bench/train_step.py                                  # CPU: mini SD1.5/SDXL and the tiny test pipelines
    python bench/train_step.py --methods controlnet             # ControlNet only: mini-sd15, tiny-sd (GPU: sd15)
    python bench/train_step.py --device cuda                    # SD1.5 (512 px, batch 4) and SDXL (1024 px, batch 1)
    python bench/train_step.py --device cuda --compile          # the toolkit's UNet under torch.compile (CUDA graphs)

The reference (docs/benchmarks.md, 'train_step') is the loop of diffusers' train_dreambooth_lora*.py, written out below:
eager PyTorch, peft LoRA on to_q/to_k/to_v/to_out.0, images read and transformed, the VAE and the text
encoder(s) run on every step, bf16 autocast with bf16 frozen weights and fp32 LoRA parameters on a GPU, AdamW.
The toolkit side is `train(lora, pipe, dataset, cfg)` as recipes/train_dreambooth_lora.py runs it: VAE moments
and text states cached once by the method's `prepare`, so a step runs the UNet alone.

Both sides use models built from the same configs (random weights: speed depends on the architecture, not the
weights) and the same images on disk. Each side runs `--rounds` times, alternating, so the machine's drift hits
both; a step's time is the interval between two optimizer steps (data, forward, backward, clip, AdamW, logging),
with warm-up steps left out; the report is the median. Peak memory is `torch.cuda.max_memory_allocated` on a GPU;
on the CPU the peak growth of the resident set, sampled every 5 ms (`PeakRSS`).

The ControlNet row (`--methods controlnet`) puts the step of diffusers' train_controlnet.py (images and
conditioning images read and transformed, VAE and text encoder on every step, ControlNet then UNet, AdamW on
the ControlNet) against recipes/train_controlnet.py's (VAE moments, text states and the conditioning image cached
once by the method's prepare: a step runs the ControlNet and the UNet), same learning rate 1e-5; no ceiling
column there.

The 'ceiling' column is the reference against its own UNet step run alone on inputs made once (no data loading,
VAE, text encoder or engine): the most that caching and leaner data handling can gain. Where the VAE and text
encoders cost little (the tiny test pipelines) it is close to 1x whatever a toolkit caches; going past it takes a
faster step itself (the fused AdamW counts at batch 1; compilation and CUDA graphs on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from customize.methods import lora
from customize.models import build_clip_tokenizer, is_sdxl, tiny_pipeline
from customize.training import train
from customize.training.config import COMPILE_MODES

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 4
LEARNING_RATE = 1e-4
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NUM_IMAGES = 8  # a DreamBooth-sized instance set that every batch size here divides

# Architectures of the released models (their configs on the hub), built here with random weights.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")
CLIP_VOCAB = 49408


def _text_encoder(tokenizer, spec: dict, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **spec)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


# Mini versions with the released models' layout and roughly their balance of work between VAE, text encoders
# and UNet (channel widths / 10, 4-layer text encoders, images / 4 per side), small enough for a CPU. The tiny
# test pipelines (customize.models.tiny_pipeline) have a near-free VAE and text encoder, so caching them
# barely shows there.
MINI = {
    "unet_sd15": {**SD15_UNET, "block_out_channels": (32, 64, 128, 128), "cross_attention_dim": 64, "sample_size": 16},
    "unet_sdxl": {**SDXL_UNET, "block_out_channels": (32, 64, 128), "attention_head_dim": (1, 2, 4),
                  "cross_attention_dim": 64 + 128, "addition_time_embed_dim": 32,
                  "projection_class_embeddings_input_dim": 128 + 6 * 32, "sample_size": 32},
    "vae": {**SD_VAE, "block_out_channels": (16, 32, 64, 64), "norm_num_groups": 8},
    "clip_l": {**CLIP_L, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
               "projection_dim": 64},
    "clip_bigg": {**CLIP_BIGG, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "projection_dim": 128},
}


def sd_like_pipeline(kind: str, mini: bool = False, seed: int = 0):
    """SD1.5 / SDXL-base architectures (or their MINI versions) with random weights. The tokenizer has a small
    vocabulary; the text encoders' cost depends on the sequence length, which is the real 77."""
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(seed)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              clip_sample=False)
    tok = build_clip_tokenizer()
    vae_spec, clip_l, clip_bigg = (MINI["vae"], MINI["clip_l"], MINI["clip_bigg"]) if mini else (SD_VAE, CLIP_L, CLIP_BIGG)
    if kind == "sd15":
        vae = AutoencoderKL(**vae_spec, scaling_factor=0.18215).eval()
        unet = UNet2DConditionModel(**(MINI["unet_sd15"] if mini else SD15_UNET)).eval()
        return StableDiffusionPipeline(
            vae=vae, text_encoder=_text_encoder(tok, clip_l, False), tokenizer=tok, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    vae = AutoencoderKL(**vae_spec, scaling_factor=0.13025, force_upcast=True).eval()
    unet = UNet2DConditionModel(**(MINI["unet_sdxl"] if mini else SDXL_UNET)).eval()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=_text_encoder(tok, clip_l, False), text_encoder_2=_text_encoder(tok, clip_bigg, True),
        tokenizer=tok, tokenizer_2=build_clip_tokenizer(), unet=unet, scheduler=scheduler,
    )


CONFIGS = {
    # name: (builder, resolution, batch size)
    "mini-sd15": (lambda: sd_like_pipeline("sd15", mini=True), 128, 4),
    "mini-sdxl": (lambda: sd_like_pipeline("sdxl", mini=True), 256, 1),
    "tiny-sd": (lambda: tiny_pipeline("sd"), 32, 4),
    "tiny-sdxl": (lambda: tiny_pipeline("sdxl"), 32, 1),
    "sd15": (lambda: sd_like_pipeline("sd15"), 512, 4),
    "sdxl": (lambda: sd_like_pipeline("sdxl"), 1024, 1),
}


# ---------------------------------------------------------------------------------------------------------------
# The reference: diffusers' train_dreambooth_lora(_sdxl).py step, without the parts that do not run per step
# ---------------------------------------------------------------------------------------------------------------


class ReferenceDreamBoothDataset(torch.utils.data.Dataset):
    """diffusers' DreamBoothDataset: open, EXIF-rotate, resize (shorter side), random crop, normalise, tokenize,
    on every access."""

    def __init__(self, folder: Path, prompt: str, tokenizers, resolution: int):
        self.paths = sorted(folder.glob("*.png"))
        self.resolution = resolution
        self.input_ids = [
            t(prompt, truncation=True, padding="max_length", max_length=t.model_max_length, return_tensors="pt").input_ids
            for t in tokenizers
        ]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = ImageOps.exif_transpose(Image.open(self.paths[i])).convert("RGB")
        original_size = (img.height, img.width)
        scale = self.resolution / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
        top = int(torch.randint(0, img.height - self.resolution + 1, ()))
        left = int(torch.randint(0, img.width - self.resolution + 1, ()))
        img = img.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, H, W)
        ids = [x[0] for x in self.input_ids]
        return {"pixel_values": pixels, "input_ids": ids, "time_ids": torch.tensor(original_size + (top, left) + (self.resolution,) * 2)}


def reference_collate(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),  # (B, 3, H, W)
        "input_ids": [torch.stack(ids) for ids in zip(*[e["input_ids"] for e in examples])],  # per tokenizer (B, L)
        "time_ids": torch.stack([e["time_ids"] for e in examples]).float(),  # (B, 6)
    }


def reference_lora_unet(pipe, device, mixed_precision: str):
    """The example scripts' trained model: the frozen UNet in the weight dtype with peft LoRA on the attention
    projections in fp32 (docs/benchmarks.md, 'train_step'), and AdamW over the LoRA parameters."""
    from peft import LoraConfig

    unet = pipe.unet.requires_grad_(False).to(device, dtype=WEIGHT_DTYPES[mixed_precision])
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    return unet, params, optimizer


def reference_loop(pipe, folder: Path, prompt: str, resolution: int, batch_size: int, steps: int, device,
                   mixed_precision: str) -> list[float]:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(mixed_precision=mixed_precision)
    sdxl = is_sdxl(pipe)
    vae = pipe.vae
    text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    weight_dtype = WEIGHT_DTYPES[mixed_precision]
    for m in [vae, *text_encoders]:
        m.requires_grad_(False).to(device, dtype=weight_dtype)
    if sdxl:  # the SDXL script keeps the VAE in fp32 (it overflows in fp16)
        vae.to(dtype=torch.float32)
    unet, params, optimizer = reference_lora_unet(pipe, device, mixed_precision)
    dataset = ReferenceDreamBoothDataset(folder, prompt, [pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else []), resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=reference_collate)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.train()

    stamps = []
    while len(stamps) < steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
                model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
                model_input = model_input.to(weight_dtype)
                noise = torch.randn_like(model_input)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                          device=model_input.device).long()
                noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
                if sdxl:
                    hidden, pooled = [], None
                    for te, ids in zip(text_encoders, batch["input_ids"]):
                        out = te(ids.to(device), output_hidden_states=True, return_dict=False)
                        pooled = out[0]
                        hidden.append(out[-1][-2])
                    added = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(device, weight_dtype)}
                    pred = unet(noisy, timesteps, torch.cat(hidden, dim=-1), added_cond_kwargs=added, return_dict=False)[0]
                else:
                    states = text_encoders[0](batch["input_ids"][0].to(device), return_dict=False)[0]
                    pred = unet(noisy, timesteps, states, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            loss.detach().item()  # the example logs the loss every step
            _sync(device)
            stamps.append(time.perf_counter())
            if len(stamps) >= steps:
                break
    return stamps


# ---------------------------------------------------------------------------------------------------------------
# The toolkit
# ---------------------------------------------------------------------------------------------------------------


class Clocked:
    """The LoRA method with a clock: the engine calls `after_step` once per optimizer step."""

    def __init__(self, method, device):
        self.method, self.device, self.stamps = method, device, []

    def __getattr__(self, name):
        return getattr(self.method, name)

    def after_step(self, model, cfg, step):
        _sync(self.device)
        self.stamps.append(time.perf_counter())


def toolkit_loop(pipe, name: str, folder: Path, prompt: str, resolution: int, batch_size: int, steps: int,
                 device, mixed_precision: str, compile: bool, out_dir: Path,
                 compile_mode: str = "default") -> list[float]:
    cfg = lora.LoRAConfig(
        pretrained_model_name_or_path=name, instance_data_dir=str(folder), instance_prompt=prompt,
        resolution=resolution, train_batch_size=batch_size, max_train_steps=steps, rank=RANK,
        learning_rate=LEARNING_RATE, mixed_precision=mixed_precision, compile=compile, compile_mode=compile_mode,
        checkpointing_steps=0,
        report_to="none", progress=False, output_dir=str(out_dir),
    )
    clocked = Clocked(lora, device)
    train(clocked, pipe, lora.build_dataset(pipe, cfg), cfg)
    return clocked.stamps


# ---------------------------------------------------------------------------------------------------------------
# The floor: the reference's UNet step alone, on inputs made once (no data, no VAE, no text encoder, no engine)
# ---------------------------------------------------------------------------------------------------------------


def unet_only_loop(pipe, prompt: str, resolution: int, batch_size: int, steps: int, device,
                   mixed_precision: str) -> list[float]:
    """What is left of the reference step once every input is precomputed: the same eager forward, loss,
    backward, clip and AdamW, nothing else."""
    weight_dtype = WEIGHT_DTYPES[mixed_precision]
    sdxl = is_sdxl(pipe)
    with torch.no_grad():  # conditioning of the right shapes, computed once
        if sdxl:
            states, _, pooled, _ = pipe.encode_prompt(prompt, device=pipe.text_encoder.device, do_classifier_free_guidance=False)
        else:
            states = pipe.encode_prompt(prompt, device=pipe.text_encoder.device, num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    states = states.expand(batch_size, -1, -1).to(device, weight_dtype)  # (B, L, D)
    added = None
    if sdxl:
        added = {"text_embeds": pooled.expand(batch_size, -1).to(device, weight_dtype),
                 "time_ids": torch.tensor([[resolution] * 2 + [0, 0] + [resolution] * 2] * batch_size,
                                          device=device, dtype=weight_dtype)}
    unet, params, optimizer = reference_lora_unet(pipe, device, mixed_precision)
    size = resolution // pipe.vae_scale_factor
    latents = torch.randn(batch_size, unet.config.in_channels, size, size, device=device, dtype=weight_dtype)
    unet.train()
    autocast = torch.autocast(torch.device(device).type, dtype=weight_dtype, enabled=mixed_precision != "no")
    stamps = []
    for _ in range(steps):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (batch_size,), device=device)
        with autocast:
            pred = unet(latents + noise, timesteps, states, added_cond_kwargs=added, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.detach().item()
        _sync(device)
        stamps.append(time.perf_counter())
    return stamps


# ---------------------------------------------------------------------------------------------------------------
# ControlNet: diffusers' train_controlnet.py step against the toolkit's (cached latents and text states)
# ---------------------------------------------------------------------------------------------------------------

CONTROLNET_LR = 1e-5  # the example's default
# name: (builder, resolution, batch size); SD only (the SDXL example is a separate script).
CONTROLNET_CONFIGS = {"mini-sd15": CONFIGS["mini-sd15"], "tiny-sd": CONFIGS["tiny-sd"], "sd15": CONFIGS["sd15"]}


class ReferenceControlNetDataset(torch.utils.data.Dataset):
    """diffusers' train_controlnet.py data: the image and its conditioning image opened, resized (shorter side)
    and centre-cropped, the image normalised to [-1, 1], the conditioning image to [0, 1], the caption tokenized,
    on every access (the example maps these transforms over the set lazily)."""

    def __init__(self, folder: Path, tokenizer, resolution: int):
        import json

        self.folder, self.resolution, self.tokenizer = folder, resolution, tokenizer
        self.rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]

    def __len__(self):
        return len(self.rows)

    def _load(self, name: str) -> torch.Tensor:
        img = Image.open(self.folder / name).convert("RGB")
        scale = self.resolution / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
        left, top = (img.width - self.resolution) // 2, (img.height - self.resolution) // 2
        img = img.crop((left, top, left + self.resolution, top + self.resolution))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W) in [0, 1]

    def __getitem__(self, i):
        row = self.rows[i]
        ids = self.tokenizer(row["text"], truncation=True, padding="max_length",
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids[0]
        return {"pixel_values": self._load(row["file_name"]) * 2 - 1,
                "conditioning_pixel_values": self._load(row["conditioning_image_file_name"]), "input_ids": ids}


def reference_controlnet_loop(pipe, folder: Path, prompt: str, resolution: int, batch_size: int, steps: int, device,
                              mixed_precision: str) -> list[float]:
    """The step of diffusers' train_controlnet.py: VAE encode and text encoder on every step (both frozen, in
    the weight dtype), the ControlNet (from the UNet, fp32, trained) then the frozen UNet with its residuals,
    MSE against the noise, clip, AdamW."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from customize.methods.controlnet import new_controlnet

    accelerator = Accelerator(mixed_precision=mixed_precision)
    weight_dtype = WEIGHT_DTYPES[mixed_precision]
    # ControlNetModel.from_unet, as the example; its conditioning encoder sized to the VAE's factor (the tiny
    # pipelines' is 2, not 8), the same network the toolkit trains
    controlnet = new_controlnet(pipe).to(device).train()
    for m in (pipe.vae, pipe.text_encoder, pipe.unet):
        m.requires_grad_(False).to(device, dtype=weight_dtype)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=CONTROLNET_LR, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8)
    dataset = ReferenceControlNetDataset(folder, pipe.tokenizer, resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    controlnet, optimizer, loader = accelerator.prepare(controlnet, optimizer, loader)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae, unet, text_encoder = pipe.vae, pipe.unet, pipe.text_encoder
    stamps = []
    while len(stamps) < steps:
        for batch in loader:
            with accelerator.accumulate(controlnet):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device).long()
                noisy = noise_scheduler.add_noise(latents.float(), noise.float(), timesteps).to(weight_dtype)
                states = text_encoder(batch["input_ids"], return_dict=False)[0]
                down, mid = controlnet(noisy, timesteps, encoder_hidden_states=states,
                                       controlnet_cond=batch["conditioning_pixel_values"].to(weight_dtype),
                                       return_dict=False)
                pred = unet(noisy, timesteps, encoder_hidden_states=states,
                            down_block_additional_residuals=[r.to(weight_dtype) for r in down],
                            mid_block_additional_residual=mid.to(weight_dtype), return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss.detach().item()
            _sync(device)
            stamps.append(time.perf_counter())
            if len(stamps) >= steps:
                break
    return stamps


def toolkit_controlnet_loop(pipe, name: str, folder: Path, prompt: str, resolution: int, batch_size: int, steps: int,
                            device, mixed_precision: str, compile: bool, out_dir: Path,
                            compile_mode: str = "default") -> list[float]:
    """recipes/train_controlnet.py's run: VAE moments, text states and the conditioning image cached by the
    method's prepare, so a step runs the ControlNet and the UNet alone."""
    from customize.methods import controlnet as cn

    cfg = cn.ControlNetConfig(
        pretrained_model_name_or_path=name, train_data_dir=str(folder), resolution=resolution,
        train_batch_size=batch_size, max_train_steps=steps, learning_rate=CONTROLNET_LR,
        mixed_precision=mixed_precision, compile=compile, compile_mode=compile_mode, checkpointing_steps=0,
        report_to="none", progress=False, output_dir=str(out_dir),
    )
    clocked = Clocked(cn.ControlNetMethod(), device)
    dataset = cn.build_dataset(pipe, cfg)
    train(clocked, cn.build_model(pipe, cfg), dataset, cfg)
    return clocked.stamps


def _write_pairs(folder: Path, resolution: int, seed: int = 0) -> Path:
    """NUM_IMAGES random images, each with a conditioning image (random black-and-white blocks) and a caption,
    as the metadata.jsonl folder both sides read."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(NUM_IMAGES):
        h, w = resolution * 5 // 4, resolution * 3 // 2
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        blocks = (rng.random((h // 8 + 1, w // 8 + 1)) > 0.5).repeat(8, 0).repeat(8, 1)[:h, :w]
        Image.fromarray((blocks * 255).astype(np.uint8)).convert("RGB").save(folder / f"{i}_cond.png")
        rows.append({"file_name": f"{i}.png", "conditioning_image_file_name": f"{i}_cond.png",
                     "text": "a photo of a room"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


class PeakRSS:
    """CPU peak memory: the resident set size sampled every 5 ms on a thread, reported as the peak above the
    size when sampling started (what a side allocates; freed pages the allocator keeps still count)."""

    def __init__(self):
        import threading

        self.start, self.peak, self._stop = self._rss(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss() - self.start)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------------------


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _write_images(folder: Path, resolution: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(NUM_IMAGES):  # a little larger than the training size, so both sides resize and crop
        h, w = resolution * 5 // 4, resolution * 3 // 2
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _step_times(stamps: list[float], warmup: int) -> list[float]:
    return list(np.diff(stamps[warmup:]))


def measure(name: str, args, device, method: str = "lora") -> dict:
    build, resolution, batch = CONFIGS[name]
    controlnet = method == "controlnet"
    cuda = torch.device(device).type == "cuda"
    mixed_precision = "bf16" if cuda else "no"
    steps = args.warmup + args.steps + 1
    prompt = "a photo of sks dog"
    sides = ("reference", "toolkit") if controlnet else ("reference", "toolkit", "unet-only")
    times = {k: [] for k in sides}
    peaks = {k: 0 for k in sides}
    warmups = {k: [] for k in sides}
    with tempfile.TemporaryDirectory() as tmp:
        folder = (_write_pairs if controlnet else _write_images)(Path(tmp) / "images", resolution)
        for r in range(args.rounds):
            for side in sides:
                # Random weights drawn on the GPU itself: an SDXL-sized model initialised on the CPU takes minutes.
                with torch.device(device) if cuda else contextlib.nullcontext():
                    pipe = build()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                reference = reference_controlnet_loop if controlnet else reference_loop
                toolkit = toolkit_controlnet_loop if controlnet else toolkit_loop
                with contextlib.nullcontext() if cuda else PeakRSS() as rss:
                    if side == "reference":
                        stamps = reference(pipe, folder, prompt, resolution, batch, steps, device, mixed_precision)
                    elif side == "unet-only":
                        stamps = unet_only_loop(pipe, prompt, resolution, batch, steps, device, mixed_precision)
                    else:
                        stamps = toolkit(pipe, name, folder, prompt, resolution, batch, steps, device,
                                         mixed_precision, args.compile, Path(tmp) / f"out{r}", args.compile_mode)
                if not cuda:
                    peaks[side] = max(peaks[side], rss.peak)
                times[side] += _step_times(stamps, args.warmup)
                # set-up, caching, compilation and the warm-up steps, until the first timed step starts
                warmups[side].append(stamps[args.warmup] - start)
                if cuda:
                    peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated())
                del pipe
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    ref, ours = statistics.median(times["reference"]), statistics.median(times["toolkit"])
    floor = statistics.median(times["unet-only"]) if "unet-only" in times else float("nan")
    return {"name": name, "method": method, "batch": batch, "resolution": resolution, "reference": ref,
            "toolkit": ours, "ratio": ref / ours, "ceiling": ref / floor, "peaks": peaks, "precision": mixed_precision,
            "warmup": {k: max(v) for k, v in warmups.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=None,
                   help="default: mini-sd15 mini-sdxl tiny-sd tiny-sdxl on cpu, sd15 sdxl on cuda")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 10 cpu, 20 cuda)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps left out at the start of each round (default 3 cpu, 10 cuda: compilation)")
    p.add_argument("--rounds", type=int, default=3, help="alternating reference/toolkit rounds")
    p.add_argument("--compile", action="store_true", help="torch.compile the toolkit's UNet (GPU: inductor)")
    p.add_argument("--compile_mode", default="reduce-overhead",
                   choices=COMPILE_MODES,
                   help="torch.compile mode on CUDA (default: reduce-overhead, i.e. CUDA graphs, for a step "
                        "bound by kernel launches such as the eager SD1.5 LoRA step)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--methods", nargs="+", choices=("lora", "controlnet"), default=["lora", "controlnet"],
                   help="the LoRA DreamBooth step, the ControlNet step (configs: %s), or both" % ", ".join(CONTROLNET_CONFIGS))
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible; run on a GPU machine or use --device cpu")
    if not cuda:  # keep accelerate (the engine's and the reference's) off a GPU the machine may have
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or (20 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    configs = args.configs or (["sd15", "sdxl"] if cuda else ["mini-sd15", "mini-sdxl", "tiny-sd", "tiny-sdxl"])
    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"training step, toolkit vs diffusers-example loop | {where} | torch {torch.__version__} | "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up | "
          f"compile={args.compile_mode if args.compile and cuda else args.compile}")
    print(f"{'method':<10} {'config':<10} {'batch':>5} {'px':>5} {'precision':>9} {'reference s/step':>17} {'toolkit s/step':>15} "
          f"{'speed-up':>9} {'ceiling':>8} {'ref peak':>12} {'ours peak':>13} {'warm-up s ref / ours':>21}")
    runs = [(m, c) for m in args.methods for c in configs if m == "lora" or c in CONTROLNET_CONFIGS]
    if "controlnet" in args.methods and not args.configs:  # the ControlNet configs: mini and tiny SD, or SD 1.5
        runs = [(m, c) for m, c in runs if m == "lora"] + [("controlnet", c) for c in (
            ["sd15"] if cuda else ["mini-sd15", "tiny-sd"])]
    for method, name in runs:
        r = measure(name, args, args.device, method)
        # GPU: max_memory_allocated; CPU: the sampled growth of the resident set
        peak = (lambda b: f"{b / 2**30:.2f} GB") if cuda else (lambda b: f"{b / 2**20:.0f} MB")  # noqa: E731
        ceiling = "-" if r["ceiling"] != r["ceiling"] else f"{r['ceiling']:.2f}x"
        print(f"{method:<10} {r['name']:<10} {r['batch']:>5} {r['resolution']:>5} {r['precision']:>9} {r['reference']:>17.4f} "
              f"{r['toolkit']:>15.4f} {r['ratio']:>8.2f}x {ceiling:>8} {peak(r['peaks']['reference']):>12} "
              f"{peak(r['peaks']['toolkit']):>13} {r['warmup']['reference']:>10.1f} / {r['warmup']['toolkit']:<8.1f}",
              flush=True)


if __name__ == "__main__":
    main()
