"""Reading: any supported LoRA file (diffusers, PEFT, kohya; or a folder holding one) -> `LoraState`, and
`inspect_lora`'s summary of a file."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from customize.formats.common import FormatError, describe_family, read_tensor_file
from customize.formats.kohya_names import (
    _KOHYA_COMPONENT,
    _SGM_ROOTS,
    SDXL_LAYOUT,
    UNetLayout,
    module_path_from_kohya,
    sgm_to_diffusers,
)
from customize.formats.lora_blocks import BlockNorm, block_norms, blocks_table
from customize.formats.lora_detect import _DIFFUSERS_SUFFIXES, detect_lora_family, detect_lora_format, lora_cross_attention_dim
from customize.formats.lora_state import (
    _CARRIED_METADATA,
    ADAPTER_METADATA_KEY,
    COMPONENTS,
    LORA_WEIGHT_NAME,
    LoraLayer,
    LoraState,
    canonical_module,
    split_key,
)

_ATTN_PROCESSOR_NAMES = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
}


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
    blocks: list[BlockNorm] | None = None  # per-block update norms (`inspect_lora(..., blocks=True)`)

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
        if self.blocks is not None:
            lines.append("blocks:      update norm ||dW||_F per block, share = its part of the summed squared norms")
            lines += blocks_table(self.blocks)
        return "\n".join(lines)


def inspect_lora(path: str | os.PathLike, layout: UNetLayout | None = None, blocks: bool = False) -> LoraInfo:
    """What the file holds; a file with NaN or infinite values is described too (`customize inspect` counts them).
    `blocks`: also the update norm per UNet block (`block_norms`, about 0.2 ms per SDXL-sized module)."""
    state = read_lora(path, layout, finite=False)
    targets = sorted({_LEAF.sub("", split_key(k)[1]) for k in state.layers})
    shown = {k: v for k, v in state.metadata.items()
             if k.startswith((*_CARRIED_METADATA, "customize.")) and k != "customize.unet_names" or k == ADAPTER_METADATA_KEY}
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
        blocks=block_norms(state, layout) if blocks else None,
    )
