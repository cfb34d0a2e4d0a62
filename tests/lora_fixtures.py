"""LoRAs on tiny seeded pipelines for the tests: random-but-nonzero adapters made by peft (so their state dicts are
what training writes), and images from a fixed seed to compare files against in-memory deltas."""

import torch
from peft import LoraConfig

from customize.formats import lora_state_from_model
from customize.formats.lora_load import find_module
from customize.formats.lora_state import split_key
from customize.models import tiny_pipeline

PROMPT = "a photo of sks dog"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def make_pipe(kind):
    """A tiny seeded pipeline ("sd" or "sdxl") without progress bars."""
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_state(kind, seed, unet_targets=UNET_TARGETS, te_targets=TE_TARGETS, rank=4, alpha=2, te_rank=2,
                  te_alpha=3):
    """A LoraState as peft would train it (B random instead of zero); te_targets=() for a UNet-only LoRA."""
    pipe = make_pipe(kind)
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
    """Add every module's dW to the pipeline's weights in memory (the reference a file must reproduce)."""
    with torch.no_grad():
        for key, layer in state.layers.items():
            module = find_module(pipe, *split_key(key))
            module.weight += layer.delta().reshape(module.weight.shape).to(module.weight.dtype)
    return pipe


def image_with_delta(kind, state, prompt=PROMPT):
    """The image of a fresh pipeline with `state`'s dW added to its weights."""
    return image(add_delta(make_pipe(kind), state), prompt)
