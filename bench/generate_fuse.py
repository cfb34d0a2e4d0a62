"""Sampling cost of LoRAs, unfused (peft layers) against fused (`customize generate --fuse`), against the base
model alone, measured in one run on the same pipeline. The sampling loop is what is timed (no loading).

    python bench/generate_fuse.py --lora out/a/pytorch_lora_weights.safetensors:0.5 --lora out/b:0.5
    python bench/generate_fuse.py -m stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --steps 30 ...

The model defaults to the committed toy model; --lora is required (a file may be given twice, as two adapters).
Prints the median seconds of each mode over --rounds alternating rounds and the ratios to the base.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    from diffusers.utils import logging as diffusers_logging

    from customize.cli import parse_lora_spec
    from customize.formats import load_lora_files
    from customize.inference import generate
    from customize.models import load_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=str(ROOT / "data" / "toy" / "base"))
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    specs = [parse_lora_spec(s) for s in a.lora]
    diffusers_logging.set_verbosity_error()  # "no text-encoder keys" for a UNet-only LoRA: true, and beside the point

    def pipeline(mode):
        pipe = load_pipeline(a.model)
        if mode != "base":
            load_lora_files(pipe, specs, fuse=mode == "fused")
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(a.device)

    def sample(pipe):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        # one batch of num_images, image i from seed i, as `customize generate` draws one prompt's images
        generate(pipe, ["a photo"] * a.num_images, num_inference_steps=a.steps, batch_size=a.num_images)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    modes = ("base", "unfused", "fused")
    pipes = {m: pipeline(m) for m in modes}
    for m in modes:
        sample(pipes[m])  # warm-up
    times = {m: [] for m in modes}
    for _ in range(a.rounds):
        for m in modes:
            times[m].append(sample(pipes[m]))
    base = statistics.median(times["base"])
    print(f"{len(specs)} LoRA(s), {a.steps} steps x {a.num_images} images on {a.device}, median of {a.rounds} rounds")
    for m in modes:
        t = statistics.median(times[m])
        print(f"{m:8s} {t:7.3f} s   {t / base:5.2f}x base")


if __name__ == "__main__":
    main()
