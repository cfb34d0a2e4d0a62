"""File formats: LoRA files (diffusers, PEFT, kohya / A1111 / ComfyUI) and textual-inversion embeddings
(diffusers, SDXL clip_l/clip_g, A1111). Every write is atomic and safetensors; pickles are only ever read
with torch.load(weights_only=True)."""

from customize.formats.common import FAMILY_NAMES, FormatError, describe_family, read_tensor_file
from customize.formats.embeddings import (
    Embedding,
    load_embedding_into,
    placeholder_tokens,
    read_embedding,
    save_embedding,
)
from customize.formats.lora import (
    LoraCompatibilityError,
    LoraInfo,
    LoraLayer,
    LoraState,
    UNetLayout,
    check_lora_compatible,
    convert_lora,
    detect_lora_family,
    detect_lora_format,
    inspect_lora,
    load_lora_files,
    lora_state_from_model,
    read_lora,
    save_lora,
)

__all__ = [
    "FAMILY_NAMES", "FormatError", "describe_family", "read_tensor_file",
    "Embedding", "load_embedding_into", "placeholder_tokens", "read_embedding", "save_embedding",
    "LoraCompatibilityError", "LoraInfo", "LoraLayer", "LoraState", "UNetLayout", "check_lora_compatible",
    "convert_lora", "detect_lora_family", "detect_lora_format", "inspect_lora", "load_lora_files",
    "lora_state_from_model", "read_lora", "save_lora",
]
