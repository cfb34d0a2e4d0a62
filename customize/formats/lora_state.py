"""The in-memory LoRA: `LoraState` ({"<component>.<diffusers module path>": LoraLayer(down, up, alpha)}),
the component and file names every format shares, and the text-encoder path convention (`canonical_module`).
customize/formats/lora.py describes the formats."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FORMATS = ("diffusers", "peft", "kohya")
# diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE and LORA_ADAPTER_METADATA_KEY (a test keeps them equal;
# importing diffusers here would cost seconds to every `customize inspect`).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_CARRIED_METADATA = ("ss_", "modelspec.")


@dataclass
class LoraLayer:
    """One adapted module: dW = (alpha / rank) * up @ down."""

    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """dW in float32, shaped like the base weight: (out, in) or (out, in, kh, kw)."""
        up = self.up.float().flatten(1)  # (out, r)
        down = self.down.float()
        dw = up @ down.flatten(1)  # (out, in * kh * kw)
        return self.scale * dw.reshape(up.shape[0], *down.shape[1:])


@dataclass
class LoraState:
    """A LoRA file in memory. Keys are "<component>.<module path>" with component in COMPONENTS and the module
    path as diffusers names it (text encoders: see `canonical_module`)."""

    layers: dict[str, LoraLayer]
    format: str = "memory"
    metadata: dict[str, str] = field(default_factory=dict)

    def components(self) -> dict[str, int]:
        """Adapted modules per component, in COMPONENTS order."""
        counts = Counter(split_key(k)[0] for k in self.layers)
        return {c: counts[c] for c in COMPONENTS if counts[c]}


def split_key(key: str) -> tuple[str, str]:
    component, _, module = key.partition(".")
    if component not in COMPONENTS or not module:
        raise ValueError(f"LoRA layer key {key!r} must look like '<{'|'.join(COMPONENTS)}>.<module path>'")
    return component, module


def canonical_module(component: str, module: str) -> str:
    """Text-encoder paths are kept as transformers 4 named them, under `text_model.` (text_projection sits
    outside it), the way kohya and older diffusers files write them: transformers 5 flattened CLIPTextModel but
    not CLIPTextModelWithProjection, and diffusers' loader drops the prefix when the model has none, so files
    written this way load into both."""
    if component == "unet" or module.startswith(("text_model.", "text_projection")):
        return module
    return f"text_model.{module}"
