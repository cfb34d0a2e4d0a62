"""Loading into a live pipeline: refuse a LoRA made for another model (`check_lora_compatible`), load files
as weighted adapters (`load_lora_files`), and read the adapters peft injected back as a `LoraState`
(`lora_state_from_model`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from customize.formats.common import FormatError, describe_family
from customize.formats.kohya_names import UNetLayout
from customize.formats.lora_detect import _DIFFUSERS_SUFFIXES, detect_lora_family, lora_cross_attention_dim
from customize.formats.lora_read import _weights_file, read_lora
from customize.formats.lora_state import COMPONENTS, LoraLayer, LoraState, canonical_module, split_key
from customize.formats.lora_write import save_lora


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


def _kohya_text_encoder_unread(state: LoraState) -> bool:
    """Whether a kohya file adapts a text encoder in none of out_proj / fc1 / fc2 (e.g. q_proj alone): diffusers
    renames such a text-encoder part to the old diffusers names and then tells the layout by the names of those
    three layers only, so `load_lora_weights` fails ("Could not automatically infer state dict type")."""
    if state.format != "kohya":
        return False
    modules: dict[str, set[str]] = {}
    for key in state.layers:
        component, module = split_key(key)
        if component != "unet":
            modules.setdefault(component, set()).add(module.rsplit(".", 1)[-1])
    return any(not names & {"out_proj", "fc1", "fc2"} for names in modules.values())


def load_lora_files(pipe, specs: list[tuple[str | os.PathLike, float]], prefix: str = "lora",
                    fuse: bool = False) -> list[str]:
    """Load LoRA files as adapters `<prefix>_<i>` (the first free names) with their weights, through diffusers'
    `load_lora_weights` + `set_adapters`; returns the adapter names. Every file is checked first, so a bad one
    loads nothing. Adapters loaded before stay loaded but inactive (set_adapters activates only these).

    With `fuse`, W += sum_i w_i dW_i is folded into the base weights (`fuse_lora`) and every adapter layer is
    then removed: sampling runs the plain layers, at the base model's cost, with no LoRA left to switch off."""
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
        if _mixed_layouts(file) or _kohya_text_encoder_unread(state):
            # diffusers misreads these files (see the two functions), so they are rewritten in peft's layout first
            with tempfile.TemporaryDirectory(prefix="customize-lora-") as tmp:
                pipe.load_lora_weights(str(save_lora(state, tmp, "peft")), adapter_name=name)
        else:
            pipe.load_lora_weights(str(file), adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(w) for _, w in specs])
        if fuse:
            pipe.fuse_lora(adapter_names=names)
            pipe.unload_lora_weights()
    return names


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
