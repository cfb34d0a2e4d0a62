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
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from customize.formats.common import (
    CLIP_L_WIDTH,
    CROSS_ATTENTION_FAMILY,
    OPENCLIP_H_WIDTH,
    FormatError,
    describe_family,
    read_tensor_file,
)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FORMATS = ("diffusers", "peft", "kohya")
# diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE and LORA_ADAPTER_METADATA_KEY (a test keeps them equal;
# importing diffusers here would cost seconds to every `customize inspect`).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"

_KOHYA_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# kohya sd-scripts' `ss_base_model_version` values, and the Stability model-spec architecture names
_KOHYA_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                   "sdxl": "stable-diffusion-xl-v1-base/lora"}
_MODELSPEC_IMPL = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
_CARRIED_METADATA = ("ss_", "modelspec.")


# ---------------------------------------------------------------------------------------------------------------
# In-memory LoRA
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# kohya names <-> module paths
# ---------------------------------------------------------------------------------------------------------------

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


def canonical_module(component: str, module: str) -> str:
    """Text-encoder paths are kept as transformers 4 named them, under `text_model.` (text_projection sits
    outside it), the way kohya and older diffusers files write them: transformers 5 flattened CLIPTextModel but
    not CLIPTextModelWithProjection, and diffusers' loader drops the prefix when the model has none, so files
    written this way load into both."""
    if component == "unet" or module.startswith(("text_model.", "text_projection")):
        return module
    return f"text_model.{module}"


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------

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
_ATTN_PROCESSOR_NAMES = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
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


def _check_pairs(groups: dict[str, dict], where: str) -> None:
    for name, g in groups.items():
        missing = [p for p in ("down", "up") if p not in g]
        if missing:
            raise FormatError(f"{where}: module {name!r} has no {' / '.join(missing)} weight; the file is incomplete")
        if g["down"].shape[0] != g["up"].shape[1]:
            raise FormatError(
                f"{where}: module {name!r}: down {tuple(g['down'].shape)} and up {tuple(g['up'].shape)} disagree on the rank"
            )


def _parse_kohya(tensors: dict, layers_per_block: int, where: str) -> tuple[dict[str, LoraLayer], bool]:
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        name, _, suffix = key.partition(".")
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
        if part is None:
            raise FormatError(f"{where}: unexpected kohya key {key!r} (expected <name>.lora_down.weight / .lora_up.weight / .alpha)")
        groups.setdefault(name, {})[part] = t
    _check_pairs(groups, where)
    layers, sgm = {}, False
    for name, g in groups.items():
        prefix = next(p for p in _KOHYA_COMPONENT if name.startswith(p))
        component = _KOHYA_COMPONENT[prefix]
        path = module_path_from_kohya(name[len(prefix) :])
        if component == "unet" and path.split(".")[0] in _SGM_ROOTS:
            sgm = True
            path = sgm_to_diffusers(path, layers_per_block)
        rank = g["down"].shape[0]
        # A kohya module without `.alpha` is read as alpha = rank (scale 1), as kohya's own loader, diffusers
        # and ComfyUI all do. (kohya's *training* default is --network_alpha=1, which it writes into the file,
        # so files from its trainer carry alpha = 1 explicitly; our writer always writes alpha.)
        alpha = float(g["alpha"].item()) if "alpha" in g else float(rank)
        layers[f"{component}.{canonical_module(component, path)}"] = LoraLayer(g["down"], g["up"], alpha)
    return layers, sgm


def _parse_diffusers(tensors: dict, where: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        component = next((c for c in COMPONENTS if key.startswith(c + ".")), None)
        # diffusers' first format held UNet attention processors only and had no component prefix
        rest = key[len(component) + 1 :] if component else key
        component = component or "unet"
        suffix = next(s for s in _DIFFUSERS_SUFFIXES if key.endswith(s))
        part = _DIFFUSERS_SUFFIXES[suffix][1]
        module = rest[: -len(suffix)]
        if suffix.startswith("_lora"):
            table = _ATTN_PROCESSOR_NAMES["unet" if component == "unet" else "text"]
            head, _, proc = (module + "_lora").rpartition(".")
            module = f"{head.removesuffix('.processor')}.{table[proc]}"
        groups.setdefault(f"{component}.{canonical_module(component, module)}", {})[part] = t
    _check_pairs(groups, where)
    return groups


def _adapter_configs(metadata: dict[str, str]) -> dict[str, object]:
    """{component: peft LoraConfig} from diffusers' adapter metadata ("unet.r", "unet.lora_alpha", ...)."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    from peft import LoraConfig

    fields = json.loads(raw)
    out = {}
    for component in COMPONENTS:
        config = {k[len(component) + 1 :]: v for k, v in fields.items() if k.startswith(component + ".")}
        if config:
            out[component] = LoraConfig(**config)
    return out


def _adapter_alpha(config, module: str, rank: int) -> float:
    """alpha such that alpha / rank is the scale peft gives `module` under `config` (the LoraConfig diffusers'
    `load_lora_weights` builds from the same metadata); alpha = rank (scale 1) without one."""
    if config is None:
        return float(rank)
    from peft.utils.other import get_pattern_key

    alpha = config.lora_alpha
    for name in (module, module.removeprefix("text_model.")):  # patterns may name either text-encoder form
        key = get_pattern_key(config.alpha_pattern.keys(), name)
        if key in config.alpha_pattern:
            alpha = config.alpha_pattern[key]
            break
    scale = alpha / rank**0.5 if config.use_rslora else alpha / rank
    return float(scale * rank)


def _weights_file(path: str | os.PathLike) -> Path:
    """A LoRA file, or the one in a folder (diffusers' pytorch_lora_weights.safetensors first)."""
    path = Path(path)
    if path.is_dir():
        if (path / LORA_WEIGHT_NAME).is_file():
            return path / LORA_WEIGHT_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise FormatError(f"{path}: expected {LORA_WEIGHT_NAME} or exactly one .safetensors file in the folder")
        return found[0]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    return path


def read_lora(path: str | os.PathLike, layout: UNetLayout | None = None, finite: bool = True) -> LoraState:
    """Read a diffusers, PEFT or kohya LoRA file (or a folder holding one).

    `layout` (from the target UNet's config) is needed only for kohya files that name UNet modules by the
    original sgm paths (SDXL) on a UNet whose layers_per_block is not the standard 2. A file with NaN or
    infinite values is refused, naming the tensor, unless `finite=False` (inspection)."""
    path = _weights_file(path)
    tensors, metadata = read_tensor_file(path, finite=finite)
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise FormatError(f"{path}: not a LoRA file (expected a flat dict of tensors)")
    fmt = _detect(tensors, path)
    if fmt == "kohya":
        lpb = (layout or SDXL_LAYOUT).layers_per_block
        layers, sgm = _parse_kohya(tensors, lpb, str(path))
        if sgm:
            metadata = {**metadata, "customize.unet_names": "sgm"}
    else:
        configs = _adapter_configs(metadata)
        layers = {}
        for key, g in _parse_diffusers(tensors, str(path)).items():
            component, module = split_key(key)
            alpha = _adapter_alpha(configs.get(component), module, g["down"].shape[0])
            layers[key] = LoraLayer(g["down"], g["up"], alpha)
    return LoraState(layers, fmt, dict(metadata))


def _detect(tensors: dict, path) -> str:
    try:
        return detect_lora_format(tensors)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Family detection, inspection, compatibility
# ---------------------------------------------------------------------------------------------------------------


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
    if cross is not None:
        return CROSS_ATTENTION_FAMILY.get(cross)
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


_LEAF = re.compile(r".*(?:blocks|layers|attentions|resnets|samplers)\.\d+\.")


@dataclass
class LoraInfo:
    path: str
    format: str
    family: str | None
    cross_attention_dim: int | None
    num_layers: int
    parts: dict[str, int]  # component -> adapted modules
    ranks: list[int]
    alphas: list[float]
    target_modules: list[str]  # module kinds, e.g. attn1.to_q, proj_in, self_attn.q_proj
    metadata: dict[str, str]

    def summary(self) -> str:
        lines = [
            f"file:        {self.path}",
            f"kind:        LoRA ({self.format} format)",
            f"family:      {describe_family(self.family, self.cross_attention_dim)}",
            f"layers:      {self.num_layers} ({', '.join(f'{c}: {n}' for c, n in self.parts.items())})",
            f"rank:        {', '.join(map(str, self.ranks))}",
            f"alpha:       {', '.join(f'{a:g}' for a in self.alphas)}",
            f"targets:     {', '.join(self.target_modules)}",
        ]
        lines += [f"metadata:    {k} = {v if len(v) < 80 else v[:77] + '...'}" for k, v in sorted(self.metadata.items())]
        return "\n".join(lines)


def inspect_lora(path: str | os.PathLike, layout: UNetLayout | None = None) -> LoraInfo:
    """What the file holds; a file with NaN or infinite values is described too (`customize inspect` counts them)."""
    state = read_lora(path, layout, finite=False)
    targets = sorted({_LEAF.sub("", split_key(k)[1]) for k in state.layers})
    shown = {k: v for k, v in state.metadata.items() if k.startswith(_CARRIED_METADATA) or k == ADAPTER_METADATA_KEY}
    return LoraInfo(
        path=str(_weights_file(path)),
        format=state.format,
        family=detect_lora_family(state),
        cross_attention_dim=lora_cross_attention_dim(state),
        num_layers=len(state.layers),
        parts=state.components(),
        ranks=sorted({layer.rank for layer in state.layers.values()}),
        alphas=sorted({layer.alpha for layer in state.layers.values()}),
        target_modules=targets,
        metadata=shown,
    )


class LoraCompatibilityError(FormatError):
    """A LoRA made for another base model than the one it is being loaded into."""


def find_module(pipe, component: str, module: str):
    """The module a LoRA key targets, or None. Text-encoder paths are tried with and without `text_model.`
    (transformers 5 flattened CLIPTextModel; files keep the older name)."""
    root = getattr(pipe, component, None)
    if root is None:
        return None
    for candidate in (module, module.removeprefix("text_model."), f"text_model.{module}"):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _shape_problem(layer: LoraLayer, module) -> str | None:
    base = getattr(module, "base_layer", module)  # a module peft already wrapped
    if isinstance(base, torch.nn.Linear):
        want_in, want_out, kernel = base.in_features, base.out_features, ()
    elif isinstance(base, torch.nn.Conv2d):
        want_in, want_out, kernel = base.in_channels, base.out_channels, tuple(base.kernel_size)
    else:
        return f"is a {type(base).__name__}, not a Linear or Conv2d layer"
    got_in, got_out = layer.down.shape[1], layer.up.shape[0]
    if (got_in, got_out) != (want_in, want_out) or tuple(layer.down.shape[2:]) != kernel:
        return f"maps {got_in} -> {got_out} features but the model's layer maps {want_in} -> {want_out}"
    return None


def check_lora_compatible(pipe, lora: str | os.PathLike | LoraState, name: str | None = None) -> LoraState:
    """Refuse a LoRA whose family or target layers do not match `pipe`; return the file read as a LoraState.

    The message names the file's family and the model's. The layer-by-layer check (every target module must
    exist and have the file's in/out widths) also catches mismatches the family names cannot tell apart."""
    from customize.models import detect_family

    if isinstance(lora, LoraState):
        state, name = lora, name or "LoRA"
    else:
        try:
            layout = UNetLayout.from_config(pipe.unet.config)
        except FormatError:  # per-block layers_per_block: only sgm-named (kohya SDXL) files need one value
            layout = None
        state, name = read_lora(lora, layout), name or str(lora)
    file_family = detect_lora_family(state)
    model_family = detect_family(pipe)
    problems = []
    for key, layer in state.layers.items():
        component, module = split_key(key)
        target = find_module(pipe, component, module)
        if target is None:
            where = "the model has no such layer" if getattr(pipe, component, None) is not None else f"the model has no {component}"
            problems.append(f"{key}: {where}")
        elif (why := _shape_problem(layer, target)) is not None:
            problems.append(f"{key}: {why}")
    if problems or (file_family is not None and file_family != model_family):
        file_desc = describe_family(file_family, lora_cross_attention_dim(state))
        model_desc = describe_family(model_family, pipe.unet.config.cross_attention_dim)
        detail = f" {len(problems)} of {len(state.layers)} layers do not fit:" if problems else ""
        detail += "".join(f"\n  - {p}" for p in problems[:5])
        detail += f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise LoraCompatibilityError(
            f"{name}: this LoRA was made for {file_desc} but the model is {model_desc}.{detail}\n"
            "Load it into a model of the family it was trained on."
        )
    return state


def _mixed_layouts(path: Path) -> bool:
    """Whether a diffusers-style file names some layers the peft way (lora_A / lora_B) and others the older
    diffusers way (lora.down / lora_linear_layer.down), as `convert_state_dict_to_diffusers` leaves a LoRA whose
    targets it has no rename for (ResNet convolutions)."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    kinds = {kind for k in keys for suffix, (kind, _) in _DIFFUSERS_SUFFIXES.items() if k.endswith(suffix)}
    return len(kinds) > 1


def load_lora_files(pipe, specs: list[tuple[str | os.PathLike, float]], prefix: str = "lora") -> list[str]:
    """Load LoRA files as adapters `<prefix>_<i>` (the first free names) with their weights, through diffusers'
    `load_lora_weights` + `set_adapters`; returns the adapter names. Every file is checked first, so a bad one
    loads nothing. Adapters loaded before stay loaded but inactive (set_adapters activates only these)."""
    import math

    for path, weight in specs:
        if not math.isfinite(float(weight)):
            raise FormatError(f"{path}: LoRA weight {weight} is not a finite number (it would make every image "
                              "black); give a weight such as 0.8 or 1.0")
    states = [check_lora_compatible(pipe, path) for path, _ in specs]
    if any(split_key(key)[0] != "unet" for state in states for key in state.layers):
        # diffusers loads text-encoder layers through transformers' adapter hooks, which some transformers
        # releases refuse with older peft releases: say so once, before anything loads
        from customize import env

        env.check()
    taken = {a for names in pipe.get_list_adapters().values() for a in names}
    free = (f"{prefix}_{i}" for i in range(len(taken) + len(specs) + 1) if f"{prefix}_{i}" not in taken)
    names = []
    for (path, _), state, name in zip(specs, states, free):
        file = _weights_file(path)
        if _mixed_layouts(file):
            # diffusers reads the layout of a file from its first key and drops the keys of the other one, so
            # such a file is rewritten in one layout (peft's) first
            with tempfile.TemporaryDirectory(prefix="customize-lora-") as tmp:
                pipe.load_lora_weights(str(save_lora(state, tmp, "peft")), adapter_name=name)
        else:
            pipe.load_lora_weights(str(file), adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(w) for _, w in specs])
    return names


# ---------------------------------------------------------------------------------------------------------------
# From a model with peft adapters
# ---------------------------------------------------------------------------------------------------------------


def lora_state_from_model(pipe, adapter_name: str | None = None) -> LoraState:
    """The LoRA layers peft injected into a pipeline's UNet / text encoders (or a dict {component: module}).
    alpha is stored as scale * rank, so rsLoRA (scale alpha / sqrt(r)) is written with the same dW."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    modules = pipe if isinstance(pipe, dict) else {c: getattr(pipe, c, None) for c in COMPONENTS}
    layers = {}
    for component, root in modules.items():
        if root is None:
            continue
        for name, m in root.named_modules():
            if not isinstance(m, PeftLoraLayer) or not m.lora_A:
                continue
            names = [adapter_name] if adapter_name else list(m.lora_A)
            if len(names) != 1:
                raise ValueError(f"{component}.{name} holds adapters {list(m.lora_A)}: pass adapter_name=")
            a = names[0]
            if a not in m.lora_A:
                continue
            if m.use_dora.get(a, False):
                raise FormatError(f"{component}.{name}: DoRA adapters cannot be written as a plain LoRA file")
            down, up = m.lora_A[a].weight.detach(), m.lora_B[a].weight.detach()
            module = canonical_module(component, name.removeprefix("base_model.model."))
            layers[f"{component}.{module}"] = LoraLayer(down.clone(), up.clone(), float(m.scaling[a] * down.shape[0]))
    if not layers:
        raise ValueError("the model holds no peft LoRA layers" + (f" for adapter {adapter_name!r}" if adapter_name else ""))
    return LoraState(layers)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


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


def _kohya_prefix(component: str, family: str | None) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder_2":
        return "lora_te2_"
    return "lora_te1_" if family == "sdxl" else "lora_te_"


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
