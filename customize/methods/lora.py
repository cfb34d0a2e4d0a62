"""LoRA (Hu et al., 2021) for Stable Diffusion: DreamBooth-LoRA and style LoRA, SD 1.x/2.x and SDXL.

Each adapted linear layer W (out x in) becomes W + (alpha / r) B A with A (r x in) random and B (out x r) zero,
so the adapted model equals the base model at step 0; only A and B train. The layers are peft's, injected with
diffusers' `add_adapter` hook (UNet) or peft's `inject_adapter_in_model` (text encoders); the file is written by the
toolkit's one LoRA writer, `customize.formats.save_lora`, in the format `lora_format` names (diffusers, peft or
kohya), with each module's alpha, the base family, the trigger words and the run's settings in its metadata, so
`pipe.load_lora_weights(dir)` (and A1111 / ComfyUI, for kohya) rebuilds the same scale alpha / r.

Training data and loss are DreamBooth's (instance prompt, optional prior preservation, or per-image captions for
a style LoRA); what differs is which weights train, their precision (`prepare`) and the file (`save`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from customize.formats.lora_state import FORMATS, LORA_WEIGHT_NAME
from customize.methods import dreambooth
from customize.methods.dreambooth import DreamBoothConfig, build_dataset, collate, loss, validate  # noqa: F401  (shared hooks)
from customize.training import sd

# Module-name suffixes peft matches (a target matches a module whose qualified name ends with ".<target>").
UNET_TARGETS = {
    # the attention projections of every transformer block (self- and cross-attention)
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    # every linear layer of the transformer blocks: attention plus the GEGLU feed-forward
    "all-linear": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    # attention plus both 3x3 convolutions of every ResNet block (LoCon): reaches the levels without attention,
    # where fine detail (thin arms, stripes) is drawn; peft adapts a Conv2d with a 3x3 A and a 1x1 B
    "attention+conv": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
    # only the keys and values of cross-attention (Custom Diffusion, Kumari et al. 2023)
    "cross-kv": ("attn2.to_k", "attn2.to_v"),
}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "default"


@dataclass
class LoRAConfig(DreamBoothConfig):
    rank: int = field(default=4, metadata={"help": "LoRA rank r."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (> 0); the update is scaled by alpha / r. Unset: r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input, in [0, 1)."})
    lora_target: str = field(
        default="attention",
        metadata={"help": "UNet layers to adapt: 'attention' (to_q/k/v/out), 'all-linear' (+ feed-forward), "
                          "'attention+conv' (+ the ResNet blocks' 3x3 convolutions) or 'cross-kv' (the keys and "
                          "values of cross-attention only, as Custom Diffusion)."}
    )
    lora_format: str = field(
        default="diffusers",
        metadata={"help": "File format of the trained LoRA: 'diffusers' or 'peft' (pytorch_lora_weights.safetensors, "
                          "for pipe.load_lora_weights(folder)) or 'kohya' (<output folder name>.safetensors, to drop "
                          "into A1111's models/Lora or ComfyUI's models/loras; diffusers loads it too)."}
    )
    learning_rate: float = 1e-4
    max_train_steps: int = 500

    # The file's format does not change what trains: a resumed run may write another one.
    RESUME_FREE: ClassVar[frozenset[str]] = DreamBoothConfig.RESUME_FREE | {"lora_format"}
    # The run settings recorded in the LoRA file's metadata (customize.formats.LoraTraining); no paths.
    FILE_SETTINGS: ClassVar[tuple[str, ...]] = (
        "rank", "lora_alpha", "lora_dropout", "lora_target", "train_text_encoder", "learning_rate", "lr_scheduler",
        "lr_warmup_steps", "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "resolution",
        "mixed_precision", "seed", "with_prior_preservation", "prior_loss_weight", "snr_gamma", "noise_offset",
        "use_captions",
    )

    def lora_file_name(self) -> str:
        """pytorch_lora_weights.safetensors (what load_lora_weights(folder) looks for) for diffusers / peft; for
        kohya the output folder's name, which A1111 and ComfyUI show as the LoRA's name (<lora:NAME:1>)."""
        if self.lora_format != "kohya":
            return LORA_WEIGHT_NAME
        return f"{Path(self.output_dir).resolve().name or 'lora'}.safetensors"

    def trigger_words(self) -> tuple[str, ...]:
        """What calls the LoRA up in a prompt: the instance prompt (none for per-image captions)."""
        return () if self.use_captions else (self.instance_prompt,)

    def __post_init__(self):
        super().__post_init__()
        if self.lora_format not in FORMATS:
            raise ValueError(f"lora_format must be one of {', '.join(FORMATS)}, got {self.lora_format!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0 (the update is scaled by alpha / rank), got {self.lora_alpha}; "
                             "leave it out for alpha = rank")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target not in UNET_TARGETS:
            raise ValueError(f"lora_target must be one of {sorted(UNET_TARGETS)}, got {self.lora_target!r}")


def alpha(cfg: LoRAConfig) -> float:
    """lora_alpha, or the rank when it is unset (None; 0 is refused by the config, never read as unset)."""
    return cfg.rank if cfg.lora_alpha is None else cfg.lora_alpha


def lora_config(cfg: LoRAConfig, targets):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank, lora_alpha=alpha(cfg), lora_dropout=cfg.lora_dropout,
        init_lora_weights=True,  # A ~ Kaiming-uniform, B = 0: the update is exactly zero at init
        target_modules=list(targets),
    )


def _add_adapter(module, config) -> list[torch.nn.Parameter]:
    """Inject the adapter once (a resumed run calls this again on the same model) and return its parameters,
    kept in float32 even when the base weights are half precision.

    The UNet gets it through diffusers' `add_adapter`; a text encoder straight through peft's
    `inject_adapter_in_model`, which is all transformers' `add_adapter` does after a version gate that refuses
    peft releases older than the transformers release wants (transformers 5.24 and peft 0.21), though the
    layers and their state dict are the same."""
    if ADAPTER not in (getattr(module, "peft_config", None) or {}):
        from diffusers.models.modeling_utils import ModelMixin

        if isinstance(module, ModelMixin):
            module.add_adapter(config, adapter_name=ADAPTER)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    params = [p for n, p in module.named_parameters() if ".lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def adapted_modules(pipe, cfg: LoRAConfig) -> dict[str, torch.nn.Module]:
    """The pipeline components that carry an adapter, by their pipeline attribute name."""
    names = ["unet"] + (["text_encoder", "text_encoder_2"] if cfg.train_text_encoder else [])
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def trainable_parameters(pipe, cfg: LoRAConfig):
    """Freeze every base weight, add LoRA to the UNet (and text encoders), return the LoRA A/B matrices."""
    for module in [pipe.vae, pipe.unet] + sd.text_encoders(pipe):
        module.requires_grad_(False)
    params = []
    for name, module in adapted_modules(pipe, cfg).items():
        targets = UNET_TARGETS[cfg.lora_target] if name == "unet" else TEXT_ENCODER_TARGETS
        params += _add_adapter(module, lora_config(cfg, targets))
    return params


def prepare(pipe, dataset, cfg: LoRAConfig, accelerator):
    """DreamBooth's feature cache (computed by the full-precision encoders), then, under mixed precision, the
    frozen base weights of the UNet and text encoders in the autocast dtype, as diffusers' LoRA scripts keep
    them: half the memory, and autocast no longer re-casts every weight at every call. The LoRA matrices stay
    float32. (The VAE stays float32: SDXL's overflows in fp16.)"""
    dataset = dreambooth.prepare(pipe, dataset, cfg, accelerator)
    cast_frozen_weights(pipe, cfg.mixed_precision)
    return dataset


def cast_frozen_weights(pipe, mixed_precision: str) -> None:
    """Under fp16 / bf16 autocast, the frozen weights of the UNet and text encoders in that dtype (what requires
    grad stays float32); the VAE is left as it is."""
    dtype = dreambooth.AUTOCAST_DTYPES.get(mixed_precision)
    if dtype is not None:
        for module in [pipe.unet, *sd.text_encoders(pipe)]:
            for p in module.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)


def lora_training(cfg: LoRAConfig):
    """What the file records about the run: base model (a local folder by its name only), trigger words, the
    FILE_SETTINGS (lora_alpha as used: the rank when unset), and the output folder's name as its title."""
    from customize.formats.lora_write import LoraTraining

    base = cfg.pretrained_model_name_or_path
    if base and Path(base).exists():
        base = Path(base).resolve().name
    settings = {name: getattr(cfg, name) for name in cfg.FILE_SETTINGS if hasattr(cfg, name)}
    settings["lora_alpha"] = alpha(cfg)
    if not cfg.with_prior_preservation:
        settings.pop("prior_loss_weight", None)
    return LoraTraining(base_model=base, trigger_words=tuple(cfg.trigger_words()), settings=settings,
                        title=Path(cfg.output_dir).resolve().name or None)


def save(pipe, cfg: LoRAConfig, out_dir) -> Path:
    """Write the trained adapters through customize.formats' writer (atomically) as `cfg.lora_file_name()` in
    `cfg.lora_format`: the peft layers read back as a LoraState (alpha per module), the family from the model."""
    from customize.formats.kohya_names import UNetLayout
    from customize.formats.lora_load import lora_state_from_model
    from customize.formats.lora_write import save_lora
    from customize.models import detect_family

    state = lora_state_from_model(adapted_modules(pipe, cfg), adapter_name=ADAPTER)
    family = detect_family(pipe)
    layout = UNetLayout.from_config(pipe.unet.config) if cfg.lora_format == "kohya" and family == "sdxl" else None
    return save_lora(state, Path(out_dir) / cfg.lora_file_name(), cfg.lora_format, family=family, layout=layout,
                     training=lora_training(cfg))


def model_card(cfg: LoRAConfig) -> str:
    targets = UNET_TARGETS[cfg.lora_target] + (TEXT_ENCODER_TARGETS if cfg.train_text_encoder else ())
    return dreambooth.model_card(
        cfg, kind="LoRA",
        extra={"rank / alpha": f"{cfg.rank} / {alpha(cfg):g}", "adapted layers": ", ".join(targets),
               "file": f"`{cfg.lora_file_name()}` ({cfg.lora_format} format)", "load with": load_hint(cfg)},
    )


def load_hint(cfg: LoRAConfig, folder: str = "<this folder>") -> str:
    """How to load the file, for the model card."""
    if cfg.lora_format != "kohya":
        return f"`pipe.load_lora_weights({folder})`"
    name = cfg.lora_file_name()
    return (f"A1111 / ComfyUI: copy `{name}` into `models/Lora` / `models/loras` and write `<lora:{Path(name).stem}:1>`; "
            f"diffusers: `pipe.load_lora_weights({folder}, weight_name=\"{name}\")`")
