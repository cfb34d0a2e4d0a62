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
from customize.formats.kohya_names import UNetLayout
from customize.formats.lora_blocks import BlockNorm, block_norms
from customize.formats.lora_detect import detect_lora_family, detect_lora_format
from customize.formats.lora_load import (
    LoraCompatibilityError,
    check_lora_compatible,
    load_lora_files,
    lora_state_from_model,
)
from customize.formats.lora_merge import MergeReport, block_weights, merge_loras, scale_lora
from customize.formats.lora_read import LoraInfo, inspect_lora, read_lora
from customize.formats.lora_state import LoraLayer, LoraState
from customize.formats.lora_write import LoraTraining, convert_lora, save_lora

__all__ = [
    "FAMILY_NAMES", "FormatError", "describe_family", "read_tensor_file",
    "Embedding", "load_embedding_into", "placeholder_tokens", "read_embedding", "save_embedding",
    "LoraCompatibilityError", "LoraInfo", "LoraLayer", "LoraState", "UNetLayout", "check_lora_compatible",
    "convert_lora", "detect_lora_family", "detect_lora_format", "inspect_lora", "load_lora_files",
    "lora_state_from_model", "read_lora", "save_lora", "LoraTraining",
    "MergeReport", "block_weights", "merge_loras", "scale_lora", "BlockNorm", "block_norms",
]
