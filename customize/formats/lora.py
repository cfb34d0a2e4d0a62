"""LoRA files: read, write, detect and convert diffusers, PEFT and kohya (A1111 / ComfyUI) files.

A LoRA adds to a frozen weight W (out, in) the low-rank update (Hu et al. 2021, eq. 3)

    dW = (alpha / r) * B @ A,        A = "down" (r, in),  B = "up" (out, r)

(a conv layer has A (r, in, kh, kw) and B (out, r, 1, 1)). Every format stores A and B; they differ in the key
names and in where alpha lives (docs/formats.md, 'LoRA files'):

  diffusers  unet.<module>.lora.down.weight / .lora.up.weight;
             text_encoder[_2].<module>.lora_linear_layer.down.weight / .up.weight
  peft       <component>.<module>.lora_A.weight / .lora_B.weight
             For both, alpha lives in the `lora_adapter_metadata` JSON of the safetensors header (peft LoraConfig
             fields per component: "unet.r", "unet.lora_alpha", "unet.alpha_pattern", ...); diffusers'
             `load_lora_weights` reads it. A file without it means alpha = r (scale 1).
  kohya      lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha (one scalar per module), where <name>
             is the module path with '.' -> '_'; text encoders under lora_te_ (SD 1/2) or lora_te1_ / lora_te2_
             (SDXL). SD 1.x/2.x files use diffusers module paths; SDXL files use the original (sgm) UNet paths
             (input_blocks_4_1_..., middle_block_1_..., output_blocks_0_1_...), which need the UNet's
             layers_per_block to renumber.

In memory every file is a `LoraState`: {"<component>.<diffusers module path>": LoraLayer(down, up, alpha)},
so each conversion is read -> LoraState -> write and keeps every dW exactly.

The code lives in one module per job; this module re-exports their public names (and is where the tests and
older code import them from):

  lora_state.py   the in-memory LoRA (LoraLayer, LoraState), component / file names, canonical_module
  kohya_names.py  module path <-> kohya name, SDXL's original (sgm) block names, UNetLayout
  lora_read.py    any file -> LoraState (read_lora), inspect_lora
  lora_detect.py  format from key names, base family from shapes / names / metadata
  lora_load.py    into a live pipeline: check_lora_compatible, load_lora_files, lora_state_from_model
  lora_write.py   LoraState -> file (save_lora, the toolkit's one LoRA writer, and its metadata), convert_lora
  lora_merge.py   training-free merges of LoraStates (merge_loras: concat, linear, svd, ties, dare; block weights)
"""

from __future__ import annotations

from customize.formats.common import FormatError
from customize.formats.kohya_names import (
    SD_LAYOUT,
    SDXL_LAYOUT,
    UNetLayout,
    diffusers_to_sgm,
    kohya_name,
    module_path_from_kohya,
    sgm_to_diffusers,
)
from customize.formats.lora_detect import detect_lora_family, detect_lora_format, lora_cross_attention_dim
from customize.formats.lora_load import (
    LoraCompatibilityError,
    _mixed_layouts,
    check_lora_compatible,
    find_module,
    load_lora_files,
    lora_state_from_model,
)
from customize.formats.lora_read import LoraInfo, _weights_file, inspect_lora, read_lora
from customize.formats.lora_state import (
    ADAPTER_METADATA_KEY,
    COMPONENTS,
    FORMATS,
    LORA_WEIGHT_NAME,
    LoraLayer,
    LoraState,
    canonical_module,
    split_key,
)
from customize.formats.lora_write import TRAINING_KEYS, LoraTraining, convert_lora, save_lora, training_metadata

__all__ = [
    "FormatError", "ADAPTER_METADATA_KEY", "COMPONENTS", "FORMATS", "LORA_WEIGHT_NAME", "LoraLayer", "LoraState", "canonical_module",
    "split_key", "SD_LAYOUT", "SDXL_LAYOUT", "UNetLayout", "diffusers_to_sgm", "kohya_name", "module_path_from_kohya",
    "sgm_to_diffusers", "read_lora", "LoraInfo", "inspect_lora", "detect_lora_format", "detect_lora_family",
    "lora_cross_attention_dim", "LoraCompatibilityError", "check_lora_compatible", "find_module", "load_lora_files",
    "lora_state_from_model", "save_lora", "convert_lora", "LoraTraining", "TRAINING_KEYS", "training_metadata",
]
