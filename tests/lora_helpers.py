"""Small LoRAs for tests: tiny SD / SDXL pipelines, random LoRA layers, and peft adapters with random B on every
component of a tiny pipeline. Imported by tests/test_formats.py, tests/test_merge.py,
tests/test_inspect_blocks.py and tests/test_ziplora.py."""

from __future__ import annotations

import torch
from peft import LoraConfig

from customize.formats import LoraLayer
from customize.models import tiny_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def tiny_pipe(kind):
    """The tiny seeded pipeline of `kind` ("sd" / "sdxl"), progress bar off."""
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_layer(g, r, out=12, inn=10, conv=False, alpha=None):
    """A LoRA layer with random A and B (a 3x3 convolution's when `conv`), alpha r / 2 unless given."""
    down = torch.randn(r, inn, 3, 3, generator=g) if conv else torch.randn(r, inn, generator=g)
    up = torch.randn(out, r, 1, 1, generator=g) if conv else torch.randn(out, r, generator=g)
    return LoraLayer(down, up, float(alpha if alpha is not None else r / 2))


def add_lora(pipe, seed=1, alpha_pattern=None):
    """peft adapters on every component, with a rank pattern, conv layers and random B (so dW != 0).
    alpha is uniform per component unless `alpha_pattern` is given: diffusers' kohya reader drops per-module
    alphas of attention projections (its network_alphas names for to_q/k/v/out miss), so kohya files with
    mixed alphas are checked against our reader only (test_formats.py: test_alpha_patterns_survive_every_format)."""
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=UNET_TARGETS,
                                     rank_pattern={"proj_in": 2}, alpha_pattern=alpha_pattern or {}))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=TE_TARGETS))
    if getattr(pipe, "text_encoder_2", None) is not None:
        pipe.text_encoder_2.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=TE_TARGETS))
    g = torch.Generator().manual_seed(seed)
    for comp in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        for name, p in comp.named_parameters() if comp is not None else ():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.3
    return pipe


# the LoRA a merge test trains on: attention, proj_in and a ResNet convolution in the UNet, attention and fc1 in
# the text encoder
STATE_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
PROMPT = "a photo of sks dog"


def trained_state(kind, seed, unet_targets=STATE_UNET_TARGETS, te_targets=TE_TARGETS, rank=4, alpha=2, te_rank=2,
                  te_alpha=3):
    """A LoraState as peft would train it (B random instead of zero), read back with lora_state_from_model;
    te_targets=() for a UNet-only LoRA."""
    from customize.formats import lora_state_from_model

    pipe = tiny_pipe(kind)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(unet_targets)))
    comps = [pipe.unet]
    if te_targets:
        pipe.text_encoder.add_adapter(LoraConfig(r=te_rank, lora_alpha=te_alpha, target_modules=list(te_targets)))
        comps.append(pipe.text_encoder)
    g = torch.Generator().manual_seed(seed)
    for comp in comps:
        for name, p in comp.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.3
    return lora_state_from_model(pipe)


def image(pipe, prompt=PROMPT):
    """(1, H, W, 3) float image of `prompt` after 2 steps from seed 0."""
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def add_delta(pipe, state):
    """Add every module's dW to the pipeline's weights in memory (the reference a LoRA file must reproduce)."""
    from customize.formats.lora_load import find_module
    from customize.formats.lora_state import split_key

    with torch.no_grad():
        for key, layer in state.layers.items():
            module = find_module(pipe, *split_key(key))
            module.weight += layer.delta().reshape(module.weight.shape).to(module.weight.dtype)
    return pipe


def image_with_delta(kind, state, prompt=PROMPT):
    """The image of a fresh tiny pipeline with `state`'s dW added to its weights."""
    return image(add_delta(tiny_pipe(kind), state), prompt)
