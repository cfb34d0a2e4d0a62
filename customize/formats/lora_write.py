"""Writing: a `LoraState` -> a diffusers, PEFT or kohya .safetensors file (`save_lora`, the one LoRA writer of
the toolkit), with its metadata; `convert_lora` is read -> write."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from customize.formats.common import FormatError
from customize.formats.kohya_names import SDXL_LAYOUT, UNetLayout, _kohya_prefix, diffusers_to_sgm, kohya_name
from customize.formats.lora_detect import detect_lora_family, lora_cross_attention_dim
from customize.formats.lora_read import _weights_file, read_lora
from customize.formats.lora_state import (
    _CARRIED_METADATA,
    ADAPTER_METADATA_KEY,
    FORMATS,
    LORA_WEIGHT_NAME,
    LoraLayer,
    LoraState,
    split_key,
)

# kohya sd-scripts' `ss_base_model_version` values, and the Stability model-spec architecture names
_KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                   "sdxl": "stable-diffusion-xl-v1-base/lora"}
_MODELSPEC_IMPL = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _adapter_config(modules: dict[str, LoraLayer], component: str) -> dict:
    """peft LoraConfig fields reproducing every module's rank and alpha: the most common value as default,
    the others as patterns. Text-encoder names drop `text_model.` so they match with and without it."""
    def pattern(module):
        return module.removeprefix("text_model.") if component != "unet" else module

    ranks = {pattern(m): layer.rank for m, layer in modules.items()}
    alphas = {pattern(m): _json_number(layer.alpha) for m, layer in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
    }


def _to_diffusers(state: LoraState, peft_names: bool) -> tuple[dict, dict]:
    tensors, per_component = {}, {}
    for key, layer in state.layers.items():
        component, module = split_key(key)
        if peft_names:
            down, up = "lora_A.weight", "lora_B.weight"
        elif component == "unet":
            down, up = "lora.down.weight", "lora.up.weight"
        else:
            down, up = "lora_linear_layer.down.weight", "lora_linear_layer.up.weight"
        tensors[f"{component}.{module}.{down}"] = layer.down
        tensors[f"{component}.{module}.{up}"] = layer.up
        per_component.setdefault(component, {})[module] = layer
    adapter = {
        f"{component}.{k}": v
        for component, modules in per_component.items()
        for k, v in _adapter_config(modules, component).items()
    }
    # diffusers' write_lora_layers writes the same two entries
    return tensors, {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, indent=2, sort_keys=True)}


def _to_kohya(state: LoraState, family: str | None, layout: UNetLayout | None) -> tuple[dict, dict]:
    tensors = {}
    for key, layer in state.layers.items():
        component, module = split_key(key)
        if component == "unet" and family == "sdxl":
            module = diffusers_to_sgm(module, layout or SDXL_LAYOUT)
        name = _kohya_prefix(component, family) + kohya_name(module)
        tensors[f"{name}.lora_down.weight"] = layer.down
        tensors[f"{name}.lora_up.weight"] = layer.up
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.alpha))  # () float32: the effective scale is alpha/rank
    ranks = Counter(layer.rank for layer in state.layers.values())
    alphas = Counter(layer.alpha for layer in state.layers.values())
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}",
    }
    if family:
        metadata.update({
            "ss_base_model_version": _KOHYA_BASE_VERSION[family],
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": _MODELSPEC_ARCH[family],
            "modelspec.implementation": _MODELSPEC_IMPL[family],
        })
    return tensors, metadata


def _output_file(path: str | os.PathLike, default_name: str) -> Path:
    path = Path(path)
    if path.suffix == ".safetensors":
        return path
    if path.suffix:
        raise FormatError(f"{path}: LoRA files are written as .safetensors; give a .safetensors path or a folder")
    return path / default_name


def save_lora(
    state: LoraState,
    path: str | os.PathLike,
    format: str = "diffusers",
    *,
    family: str | None = None,
    layout: UNetLayout | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `state` atomically as a diffusers, peft or kohya .safetensors file (a folder gets
    pytorch_lora_weights.safetensors). Every module's alpha / rank is kept: kohya as `.alpha` tensors,
    diffusers / peft in the adapter metadata that `load_lora_weights` reads.

    kohya needs the family (text encoder prefix lora_te_ vs lora_te1_, sgm UNet names for SDXL); it is taken
    from the shapes when not given. `layout` describes a non-standard SDXL UNet (tiny test models)."""
    from customize.utils import save_safetensors_atomic

    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    family = family or detect_lora_family(state)
    if format == "kohya":
        tensors, meta = _to_kohya(state, family, layout)
    else:
        tensors, meta = _to_diffusers(state, peft_names=format == "peft")
    carried = {k: v for k, v in state.metadata.items() if k.startswith(_CARRIED_METADATA)}
    meta = {**carried, **meta, **(metadata or {})}
    out = _output_file(path, LORA_WEIGHT_NAME)
    return save_safetensors_atomic(tensors, out, metadata={k: str(v) for k, v in meta.items()})


def convert_lora(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    family: str | None = None,
    layout: UNetLayout | None = None,
) -> Path:
    """Read any supported LoRA file and write it in format `to`; every layer's dW is unchanged. Writing over
    the input itself is refused (a conversion never replaces the only copy of what it reads)."""
    src_file, out = _weights_file(src), _output_file(dst, LORA_WEIGHT_NAME)
    if out.resolve() == src_file.resolve() or (out.exists() and os.path.samefile(out, src_file)):
        raise FormatError(f"{out} is the input file: write the converted LoRA to another path")
    state = read_lora(src, layout)
    family = family or detect_lora_family(state)
    if to == "kohya" and family is None and "unet" in state.components():
        raise FormatError(
            f"{src}: cannot tell the base family from the shapes (cross-attention width "
            f"{lora_cross_attention_dim(state)}); kohya names depend on it: pass family= (sd1 / sd2 / sdxl)"
        )
    return save_lora(state, dst, to, family=family, layout=layout)
