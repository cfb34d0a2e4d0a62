"""Loading pipelines: real ones from the hub or a folder, and tiny seeded ones for tests and CPU benchmarks.

`load_pipeline` is the one entry point every recipe and command uses. It detects the family (SD 1.x, SD 2.x,
SDXL) and the prediction type from the configs, never from the repository name.
`tiny_pipeline` builds a few-MB pipeline of the right family from configs, with a tokenizer built in-process,
so no test needs the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

FAMILIES = ("sd1", "sd2", "sdxl")
# model names that load_pipeline answers with tiny_pipeline(kind) instead of a download
TINY_MODELS = {"tiny-sd": "sd", "tiny-sdxl": "sdxl"}


@dataclass(frozen=True)
class ModelInfo:
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    cross_attention_dim: int
    vae_scale_factor: int
    resolution: int  # native image size in pixels


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or (
        getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
    )


def detect_family(pipe) -> str:
    """SDXL has a second text encoder and time/size conditioning; SD 2.x uses OpenCLIP-H (1024 wide);
    everything else is treated as SD 1.x (CLIP-L, 768 wide; tiny test models too)."""
    if is_sdxl(pipe):
        return "sdxl"
    if pipe.unet.config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def model_info(pipe) -> ModelInfo:
    vsf = vae_scale_factor(pipe.vae)
    sample_size = pipe.unet.config.sample_size
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return ModelInfo(
        family=detect_family(pipe),
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        cross_attention_dim=pipe.unet.config.cross_attention_dim,
        vae_scale_factor=vsf,
        resolution=sample_size * vsf,
    )


def _pipeline_class(path_or_id: str):
    """Pick the pipeline class from model_index.json when we can see it; else let diffusers decide."""
    import json

    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    index = os.path.join(path_or_id, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            name = json.load(f).get("_class_name", "")
        if "InstructPix2Pix" in name:  # its own class: the UNet reads the input image too (8 channels)
            return DiffusionPipeline
        if "XL" in name:
            return StableDiffusionXLPipeline
        if name == "StableDiffusionPipeline":
            return StableDiffusionPipeline
    return DiffusionPipeline


def load_base_pipeline(cfg):
    """The pipeline a training config starts from: its pretrained_model_name_or_path, revision and variant."""
    if not cfg.pretrained_model_name_or_path:
        raise ValueError("--pretrained_model_name_or_path is required (a hub id, a diffusers folder or a single file)")
    return load_pipeline(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant)


def load_pipeline(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    variant: str | None = None,
    scheduler: str | None = None,
    **kwargs,
):
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline from a hub id, a local diffusers folder or a single
    `.safetensors` / `.ckpt` checkpoint file. The safety checker is not loaded (it is not part of the model
    being trained and would double the download). The names in TINY_MODELS build a seeded few-MB pipeline
    in memory (tests, CPU demos of the command line)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[dtype]
    if name_or_path is None or str(name_or_path).strip() == "":
        raise ValueError("No model given: pass a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a folder.")
    opts = dict(revision=revision, variant=variant, **kwargs)
    if dtype is not None:
        opts["torch_dtype"] = dtype
    opts = {k: v for k, v in opts.items() if v is not None}
    path = str(name_or_path)
    if path in TINY_MODELS:
        pipe = tiny_pipeline(TINY_MODELS[path])
        if dtype is not None:
            pipe.to(dtype=dtype)
    elif os.path.isfile(path):
        if not path.endswith((".safetensors", ".ckpt")):
            raise ValueError(f"{path}: a single-file model must be .safetensors or .ckpt")
        try:
            pipe = StableDiffusionXLPipeline.from_single_file(path, **opts)
        except Exception:
            pipe = StableDiffusionPipeline.from_single_file(path, **opts)
    else:
        if os.path.sep in path and not os.path.exists(path) and not path.count("/") == 1:
            raise FileNotFoundError(f"{path}: no such model folder")
        cls = _pipeline_class(path)
        extra = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
        pipe = cls.from_pretrained(path, **extra, **opts)
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    if device is not None:
        pipe.to(device)
    return pipe


def scheduler_registry() -> dict:
    """Names accepted by --scheduler. Ours come from customize.core; the rest are diffusers' classes."""
    import diffusers

    from customize.core import DDIMScheduler as OurDDIM
    from customize.core import DDPMScheduler as OurDDPM

    return {
        "ddim": diffusers.DDIMScheduler,
        "ddpm": diffusers.DDPMScheduler,
        "pndm": diffusers.PNDMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler,
        "dpm++": diffusers.DPMSolverMultistepScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
        "customize-ddim": OurDDIM,
        "customize-ddpm": OurDDPM,
    }


def set_scheduler(pipe, name: str):
    reg = scheduler_registry()
    if name not in reg:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(sorted(reg))}")
    pipe.scheduler = reg[name].from_config(pipe.scheduler.config)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# Tiny pipelines
# ---------------------------------------------------------------------------------------------------------------

TINY_WORDS = (
    "a photo of sks dog cat shape circle square triangle red green blue yellow white black on the in "
    "style painting background small large top left right bottom center at with and picture rendering"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map (the byte-level alphabet of the BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_tokenizer(words=TINY_WORDS, model_max_length: int = 77):
    """A CLIPTokenizer built in memory: the 256-symbol byte alphabet (plain and end-of-word), whole-word tokens
    for `words` through a chain of merges, and CLIP's two special tokens."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(sym, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _tiny_text_encoder(tokenizer, hidden: int, with_projection: bool, projection_dim: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def tiny_pipeline(kind: str = "sd", seed: int = 0, sample_size: int = 16, prediction_type: str = "epsilon"):
    """A seeded pipeline of the right family, a few MB, built from configs (no download).

    kind "sd": StableDiffusionPipeline (UNet with cross-attention on 32-wide CLIP states).
    kind "sdxl": StableDiffusionXLPipeline (two text encoders, text_time added conditioning).
    Images are `sample_size * 2` pixels (the tiny VAE downsamples by 2)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if kind not in ("sd", "sdxl"):
        raise ValueError(f"tiny_pipeline kind must be 'sd' or 'sdxl', got {kind!r}")
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=sample_size * 2,
    ).eval()
    tok = build_clip_tokenizer()
    if kind == "sd":
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
        ).eval()
        te = _tiny_text_encoder(tok, 32, False, 32, seed + 2)
        return StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    time_dim = 8
    te = _tiny_text_encoder(tok, 32, False, 32, seed + 2)
    tok2 = build_clip_tokenizer()
    te2 = _tiny_text_encoder(tok2, 32, True, 32, seed + 3)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=te2.config.projection_dim + 6 * time_dim,
        cross_attention_dim=te.config.hidden_size + te2.config.hidden_size, norm_num_groups=16,
    ).eval()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
        scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
