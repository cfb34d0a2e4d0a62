"""kohya names <-> diffusers module paths: `lora_unet_` / `lora_te*_` prefixes, '.' -> '_' and back, and
SDXL's original (sgm) UNet block names, renumbered with the UNet's `UNetLayout`."""

from __future__ import annotations

from dataclasses import dataclass

from customize.formats.common import FormatError

_KOHYA_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}

# Module-name words that contain '_' in diffusers UNets, sgm UNets and CLIP text encoders. A kohya name joins
# the path with '_' as well, so these are re-joined when the path is recovered (longest match first).
_COMPOUND_WORDS = frozenset(
    """
    down_blocks up_blocks mid_block transformer_blocks to_q to_k to_v to_out proj_in proj_out conv_in conv_out
    conv_shortcut conv_norm_out time_emb_proj time_embedding linear_1 linear_2 add_embedding
    input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection time_embed label_emb
    text_model self_attn q_proj k_proj v_proj out_proj text_projection final_layer_norm layer_norm1 layer_norm2
    token_embedding position_embedding
    """.split()
)
_LONGEST_COMPOUND = max(w.count("_") + 1 for w in _COMPOUND_WORDS)


def kohya_name(path: str) -> str:
    return path.replace(".", "_")


def module_path_from_kohya(name: str) -> str:
    """Inverse of `kohya_name` for the module names of SD / SDXL UNets and CLIP text encoders."""
    words = name.split("_")
    parts, i = [], 0
    while i < len(words):
        for n in range(min(_LONGEST_COMPOUND, len(words) - i), 0, -1):
            joined = "_".join(words[i : i + n])
            if n == 1 or joined in _COMPOUND_WORDS:
                parts.append(joined)
                i += n
                break
    return ".".join(parts)


@dataclass(frozen=True)
class UNetLayout:
    """What renumbering between sgm and diffusers UNet paths needs from a UNet config."""

    layers_per_block: int
    up_block_has_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config) -> UNetLayout:
        lpb = config["layers_per_block"] if isinstance(config, dict) else config.layers_per_block
        if isinstance(lpb, (list, tuple)):
            if len(set(lpb)) != 1:
                raise FormatError(f"layers_per_block={lpb}: sgm (kohya SDXL) names need one value for all blocks")
            lpb = lpb[0]
        up_types = config["up_block_types"] if isinstance(config, dict) else config.up_block_types
        return cls(int(lpb), tuple("CrossAttn" in t for t in up_types))


# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 and of SD 1.x/2.x
SDXL_LAYOUT = UNetLayout(2, (True, True, False))
SD_LAYOUT = UNetLayout(2, (False, True, True, True))

_SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
_SGM_TOP = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_SGM_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_SGM_MID = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}


def _invert(d: dict) -> dict:
    return {v: k for k, v in d.items()}


def _mapped(table: dict, rest: list[str], path: str) -> str:
    name = ".".join(rest)
    if name not in table:
        raise FormatError(f"UNet module {path!r}: no known counterpart for {name!r}")
    return table[name]


def sgm_to_diffusers(path: str, layers_per_block: int) -> str:
    """Original (sgm / LDM) UNet module path -> diffusers path.

    Per resolution level the sgm UNet has layers_per_block + 1 numbered entries on each side: the down side
    has layers_per_block (resnet [+ attention]) entries and a downsampler, the up side one entry more than
    layers_per_block with the upsampler in the last; input_blocks.0 is conv_in."""
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    parts = path.split(".")
    n = layers_per_block + 1
    try:
        if parts[0] == "input_blocks":
            level, k = divmod(int(parts[1]) - 1, n)
            sub, rest = int(parts[2]), parts[3:]
            if sub == 0 and rest == ["op"]:
                return f"down_blocks.{level}.downsamplers.0.conv"
            if sub == 0:
                return f"down_blocks.{level}.resnets.{k}.{_mapped(_SGM_RESNET, rest, path)}"
            if sub == 1:
                return f"down_blocks.{level}.attentions.{k}.{'.'.join(rest)}"
        elif parts[0] == "middle_block":
            sub, rest = int(parts[1]), parts[2:]
            inner = _mapped(_SGM_RESNET, rest, path) if sub != 1 else ".".join(rest)
            return f"mid_block.{_SGM_MID[sub]}.{inner}"
        elif parts[0] == "output_blocks":
            level, k = divmod(int(parts[1]), n)
            sub, rest = int(parts[2]), parts[3:]
            if sub == 0:
                return f"up_blocks.{level}.resnets.{k}.{_mapped(_SGM_RESNET, rest, path)}"
            if rest == ["conv"]:  # the upsampler: entry 1 in a level without attention, else 2
                return f"up_blocks.{level}.upsamplers.0.conv"
            if sub == 1:
                return f"up_blocks.{level}.attentions.{k}.{'.'.join(rest)}"
    except (IndexError, ValueError, KeyError):
        pass
    raise FormatError(f"{path!r} is not a module path of the original (sgm) SD / SDXL UNet")


def diffusers_to_sgm(path: str, layout: UNetLayout) -> str:
    """diffusers UNet module path -> original (sgm) path, the inverse of `sgm_to_diffusers`."""
    top = _invert(_SGM_TOP)
    if path in top:
        return top[path]
    parts = path.split(".")
    lpb, n = layout.layers_per_block, layout.layers_per_block + 1
    try:
        if parts[0] == "down_blocks":
            level, kind, k, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "downsamplers" and rest == ["conv"]:
                return f"input_blocks.{1 + level * n + lpb}.0.op"
            if kind == "resnets":
                return f"input_blocks.{1 + level * n + k}.0.{_mapped(_invert(_SGM_RESNET), rest, path)}"
            if kind == "attentions":
                return f"input_blocks.{1 + level * n + k}.1.{'.'.join(rest)}"
        elif parts[0] == "mid_block":
            sub = _invert(_SGM_MID)[f"{parts[1]}.{parts[2]}"]
            rest = parts[3:]
            inner = ".".join(rest) if sub == 1 else _mapped(_invert(_SGM_RESNET), rest, path)
            return f"middle_block.{sub}.{inner}"
        elif parts[0] == "up_blocks":
            level, kind, k, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "upsamplers" and rest == ["conv"]:
                return f"output_blocks.{level * n + lpb}.{2 if layout.up_block_has_attention[level] else 1}.conv"
            if kind == "resnets":
                return f"output_blocks.{level * n + k}.0.{_mapped(_invert(_SGM_RESNET), rest, path)}"
            if kind == "attentions":
                return f"output_blocks.{level * n + k}.1.{'.'.join(rest)}"
    except (IndexError, ValueError, KeyError):
        pass
    raise FormatError(f"UNet module {path!r} has no counterpart in the original (sgm) UNet layout")


def _kohya_prefix(component: str, family: str | None) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder_2":
        return "lora_te2_"
    return "lora_te1_" if family == "sdxl" else "lora_te_"
