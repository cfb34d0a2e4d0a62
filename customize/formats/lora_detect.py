"""What a LoRA file is: its format from the key names alone (`detect_lora_format`), and the base family
it was made for from shapes, names and metadata (`detect_lora_family`)."""

from __future__ import annotations

from customize.formats.common import CLIP_L_WIDTH, CROSS_ATTENTION_FAMILY, OPENCLIP_H_WIDTH, FormatError
from customize.formats.kohya_names import _KOHYA_COMPONENT
from customize.formats.lora_state import LoraState, split_key

_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": ("peft", "down"),
    ".lora_B.weight": ("peft", "up"),
    ".lora.down.weight": ("diffusers", "down"),
    ".lora.up.weight": ("diffusers", "up"),
    ".lora_linear_layer.down.weight": ("diffusers", "down"),
    ".lora_linear_layer.up.weight": ("diffusers", "up"),
    # diffusers' first format (attention processors): ...attn1.processor.to_q_lora.down.weight
    "_lora.down.weight": ("diffusers", "down"),
    "_lora.up.weight": ("diffusers", "up"),
}
_UNSUPPORTED = {
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr",
    "lora_mid": "LyCORIS LoCon (CP decomposition)", "lora_B.bias": "LoRA with bias",
}


def detect_lora_format(keys) -> str:
    """'kohya', 'diffusers' or 'peft' from the key names alone."""
    keys = list(keys)
    if not keys:
        raise FormatError("empty file: no tensors")
    for marker, what in _UNSUPPORTED.items():
        if any(marker in k for k in keys):
            raise FormatError(f"{what} files are not supported (found keys with {marker!r}); only plain LoRA is")
    if all(k.startswith(tuple(_KOHYA_COMPONENT)) for k in keys):
        return "kohya"
    kinds = set()
    for k in keys:
        suffix = next((s for s in _DIFFUSERS_SUFFIXES if k.endswith(s)), None)
        if suffix is None:
            raise FormatError(
                f"key {k!r} is not a LoRA weight (expected lora_down/lora_up/alpha, lora.down/lora.up or "
                "lora_A/lora_B keys): this is not a LoRA file"
            )
        kinds.add(_DIFFUSERS_SUFFIXES[suffix][0])
    return "peft" if kinds == {"peft"} else "diffusers"


def _in_width(state: LoraState, component: str, leaf_names: tuple[str, ...]) -> int | None:
    for key, layer in state.layers.items():
        comp, module = split_key(key)
        if comp == component and module.endswith(leaf_names):
            return int(layer.down.shape[1])
    return None


def lora_cross_attention_dim(state: LoraState) -> int | None:
    """Width of the text features the UNet attends to: in_features of a cross-attention key/value projection."""
    return _in_width(state, "unet", ("attn2.to_k", "attn2.to_v"))


def _family_from_metadata(metadata: dict[str, str]) -> str | None:
    if metadata.get("customize.base_family") in CROSS_ATTENTION_FAMILY.values():  # our diffusers / peft files
        return metadata["customize.base_family"]
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    for family, version_prefix, arch_prefix in (("sdxl", "sdxl", "stable-diffusion-xl"),
                                               ("sd2", "sd_v2", "stable-diffusion-v2"),
                                               ("sd1", "sd_v1", "stable-diffusion-v1")):
        if version.startswith(version_prefix) or arch.startswith(arch_prefix):
            return family
    return None


def detect_lora_family(state: LoraState) -> str | None:
    """'sd1', 'sd2' or 'sdxl' from the shapes (cross-attention and text-encoder widths) and names, else None."""
    if "text_encoder_2" in state.components():
        return "sdxl"
    cross = lora_cross_attention_dim(state)
    if cross is not None:  # a width of no known family (tiny test models): only the metadata can tell
        return CROSS_ATTENTION_FAMILY.get(cross) or _family_from_metadata(state.metadata)
    te_width = _in_width(state, "text_encoder", ("q_proj", "k_proj", "v_proj", "fc1"))
    if te_width == OPENCLIP_H_WIDTH:
        return "sd2"
    if state.metadata.get("customize.unet_names") == "sgm":  # kohya uses sgm names for SDXL only
        return "sdxl"
    hint = _family_from_metadata(state.metadata)
    if hint:
        return hint
    if te_width == CLIP_L_WIDTH:
        return "sd1"
    return None
