"""Writing: a `LoraState` -> a diffusers, PEFT or kohya .safetensors file (`save_lora`, the one LoRA writer of
the toolkit), with its metadata; `convert_lora` is read -> write."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
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

# Where a trained LoRA's description goes. kohya files: the keys kohya sd-scripts writes (A1111 and ComfyUI show
# them) and the Stability model spec (`modelspec.trigger_phrase`: the words that call the LoRA up, comma
# separated). diffusers / peft files: these keys of the safetensors metadata (JSON values where not a string).
TRAINING_KEYS = {
    "family": "customize.base_family",
    "base_model": "customize.base_model",
    "trigger_words": "customize.trigger_words",
    "settings": "customize.training",
    "title": "customize.title",
}
# run settings whose kohya key is not ss_<name>; None: not written (ss_network_dim / ss_network_alpha come from the
# weights themselves)
_KOHYA_SETTING_KEYS = {
    "train_batch_size": "ss_batch_size_per_device",
    "lora_dropout": "ss_network_dropout",
    "snr_gamma": "ss_min_snr_gamma",
    "rank": None,
    "lora_alpha": None,
}


@dataclass
class LoraTraining:
    """What a trained LoRA's file says about it besides the weights (each module's alpha is stored with them):
    the base model, the words that call it up, the run's settings and a title. `save_lora` writes it in the
    keys of the file's format (`training_metadata`); a file read back gives it again (`from_metadata`), so a
    conversion keeps it."""

    base_model: str | None = None
    trigger_words: tuple[str, ...] = ()
    settings: dict[str, object] = field(default_factory=dict)
    title: str | None = None

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> LoraTraining:
        """From a file's metadata: ours (customize.*) first, else kohya's / the model spec's."""
        def loads(key, default):
            try:
                return json.loads(metadata[key]) if key in metadata else default
            except json.JSONDecodeError:
                return default

        words = loads(TRAINING_KEYS["trigger_words"], None)
        if not isinstance(words, list):
            words = [w.strip() for w in metadata.get("modelspec.trigger_phrase", "").split(",") if w.strip()]
        settings = loads(TRAINING_KEYS["settings"], {})
        return cls(
            base_model=metadata.get(TRAINING_KEYS["base_model"]) or metadata.get("ss_sd_model_name"),
            trigger_words=tuple(str(w) for w in words),
            settings=settings if isinstance(settings, dict) else {},
            title=metadata.get(TRAINING_KEYS["title"]) or metadata.get("modelspec.title") or metadata.get("ss_output_name"),
        )


def _kohya_value(name: str, value) -> str:
    if name == "resolution":  # kohya writes "(width, height)"
        return f"({value}, {value})"
    return str(value)


def training_metadata(training: LoraTraining, format: str, family: str | None) -> dict[str, str]:
    """`training` (and the base family) as the metadata entries of a `format` file. kohya's family keys
    (ss_base_model_version, modelspec.architecture) are written with the weights (`_to_kohya`)."""
    settings = {k: v for k, v in training.settings.items() if v is not None}
    if format != "kohya":
        meta = {
            TRAINING_KEYS["family"]: family,
            TRAINING_KEYS["base_model"]: training.base_model,
            TRAINING_KEYS["trigger_words"]: json.dumps(list(training.trigger_words)) if training.trigger_words else None,
            TRAINING_KEYS["settings"]: json.dumps(settings, sort_keys=True) if settings else None,
            TRAINING_KEYS["title"]: training.title,
        }
        return {k: v for k, v in meta.items() if v is not None}
    meta = {}
    for name, value in settings.items():
        key = _KOHYA_SETTING_KEYS.get(name, f"ss_{name}")
        if key is not None:
            meta[key] = _kohya_value(name, value)
    if "resolution" in settings:
        meta["modelspec.resolution"] = f"{settings['resolution']}x{settings['resolution']}"
    if "train_text_encoder" in settings:
        meta["ss_network_train_unet_only"] = str(not settings["train_text_encoder"])
    if training.base_model:
        meta["ss_sd_model_name"] = training.base_model
    if training.title:
        meta["ss_output_name"] = meta["modelspec.title"] = training.title
    if training.trigger_words:
        meta["modelspec.trigger_phrase"] = ", ".join(training.trigger_words)
    return meta


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


def _uniform_alpha(layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    """A LoRA whose every module has scale 1 (alpha = rank: merges, ZipLoRA) but whose ranks differ, rewritten with
    one alpha A for all modules (the most common rank) and each up weight times rank / A: the same dW. diffusers'
    kohya reader drops the per-module alphas of the UNet's attention projections and gives them the file's most
    common alpha, which is then right for every module. Other LoRAs (a trained alpha_pattern) are kept as they are."""
    ranks = Counter(layer.rank for layer in layers.values())
    if len(ranks) < 2 or any(layer.alpha != layer.rank for layer in layers.values()):
        return layers
    common = float(ranks.most_common(1)[0][0])
    return {key: layer if layer.rank == common else
            LoraLayer(layer.down, (layer.up.float() * (layer.rank / common)).to(layer.up.dtype), common)
            for key, layer in layers.items()}


def _to_kohya(state: LoraState, family: str | None, layout: UNetLayout | None) -> tuple[dict, dict]:
    tensors = {}
    layers = _uniform_alpha(state.layers)
    for key, layer in layers.items():
        component, module = split_key(key)
        if component == "unet" and family == "sdxl":
            module = diffusers_to_sgm(module, layout or SDXL_LAYOUT)
        name = _kohya_prefix(component, family) + kohya_name(module)
        tensors[f"{name}.lora_down.weight"] = layer.down
        tensors[f"{name}.lora_up.weight"] = layer.up
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.alpha))  # () float32: the effective scale is alpha/rank
    ranks = Counter(layer.rank for layer in layers.values())
    alphas = Counter(layer.alpha for layer in layers.values())
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
    training: LoraTraining | None = None,
) -> Path:
    """Write `state` atomically as a diffusers, peft or kohya .safetensors file (a folder gets
    pytorch_lora_weights.safetensors). Every module's alpha / rank is kept: kohya as `.alpha` tensors,
    diffusers / peft in the adapter metadata that `load_lora_weights` reads. The toolkit writes every LoRA
    through here: training runs (customize.methods.lora.save) and conversions.

    kohya needs the family (text encoder prefix lora_te_ vs lora_te1_, sgm UNet names for SDXL); it is taken
    from the shapes when not given. `layout` describes a non-standard SDXL UNet (tiny test models).
    `training` (base model, trigger words, settings) is written in the format's keys (`training_metadata`);
    without it, what `state`'s own metadata says (a file read back). `metadata` entries are added last."""
    from customize.utils import save_safetensors_atomic

    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    family = family or detect_lora_family(state)
    if format == "kohya":
        tensors, meta = _to_kohya(state, family, layout)
    else:
        tensors, meta = _to_diffusers(state, peft_names=format == "peft")
    carried = {k: v for k, v in state.metadata.items() if k.startswith(_CARRIED_METADATA)}
    training = training if training is not None else LoraTraining.from_metadata(state.metadata)
    meta = {**carried, **meta, **training_metadata(training, format, family), **(metadata or {})}
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
