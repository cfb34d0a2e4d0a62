"""`customize demo toy`: DreamBooth-LoRA teaches the tiny toy model a subject it has never seen, on a CPU in
a few minutes, and the world's probes score the result.

1. The 5 subject images in data/toy/subject: a magenta plus-shaped cross ("sks shape") on white, black and yellow,
   each listed twice (with its full caption and with only "a sks shape on a <bg> background").
2. A LoRA (rank 16 on the UNet's attention projections and convolutions) trains on them through the shared engine.
3. "a sks shape on a <colour> background" is drawn for three backgrounds the subject images never showed,
   by the base model and by the base model + LoRA, from the same seeds.
4. Subject fidelity (the probe sees the subject's shape and colour) and prompt fidelity (the background asked
   for) are printed for both, and everything is written to one PNG grid.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from customize.toy import experiments, quality, world

DEMO_BACKGROUNDS = ("red", "green", "blue")


def available() -> bool:
    return experiments.base_available() and experiments.SUBJECT_DIR.is_dir()


def main(argv: list[str] | None = None) -> int:
    import torch

    from customize.data.images import save_image_atomic

    p = argparse.ArgumentParser(prog="customize demo toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/demo-toy")
    p.add_argument("--steps", type=int, default=experiments.LORA_DEFAULTS["max_train_steps"])
    p.add_argument("--rank", type=int, default=experiments.LORA_DEFAULTS["rank"])
    p.add_argument("--samples", type=int, default=8, help="images per background")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not available():
        print(f"customize: the toy demo needs the toy model in {experiments.BASE_DIR} and the subject images in "
              f"{experiments.SUBJECT_DIR}")
        return 1
    if "OMP_NUM_THREADS" not in os.environ:
        # Tensors this small gain nothing from a second thread, and lose a lot when the other core is busy.
        torch.set_num_threads(1)

    start = time.perf_counter()
    unseen = [bg for bg in DEMO_BACKGROUNDS if bg in world.SUBJECT.unseen_backgrounds]
    *others, last = world.SUBJECT.instance_backgrounds
    shown = f"{', '.join(others)} and {last}" if others else last
    print(f"subject: {world.SUBJECT.colour} {world.SUBJECT.shape} as {world.SUBJECT.instance_prompt!r}, shown only on "
          f"{shown}; asking for it on {', '.join(unseen)}")
    run = experiments.dreambooth_lora(Path(a.output_dir) / "lora", progress=True, seed=a.seed,
                                      max_train_steps=a.steps, rank=a.rank)
    print(f"LoRA: {run.trained_parameters:,} trained parameters, {run.seconds:.0f} s "
          f"(weights: {Path(run.output_dir) / 'pytorch_lora_weights.safetensors'})")

    prompts = [world.SUBJECT.prompt(bg) for bg in unseen for _ in range(a.samples)]
    seeds = [a.seed * 1000 + i for i in range(len(prompts))]
    base = experiments.load_base()
    rows, table = [], []
    for name, pipe in (("base", base), ("base + LoRA", run.pipe)):
        images = quality.sample(pipe, prompts, seeds)
        readings = quality.probes.read_all(images)
        subject = sum(r.shape == world.SUBJECT.shape and r.colour == world.SUBJECT.colour for r in readings)
        on_prompt = sum(r.background == world.parse_caption(q)["background"] for r, q in zip(readings, prompts))
        table.append((name, subject / len(prompts), on_prompt / len(prompts)))
        rows.append(images)

    instance = [world.render(s) for s in world.subject_scenes(experiments.NUM_SUBJECT_IMAGES)]
    blank = world.render(world.Scene("circle", "black", "white", style=None)).point(lambda _: 255)
    cols = max(a.samples, len(instance))
    cells = instance + [blank] * (cols - len(instance))
    for k in range(len(unseen)):
        for images in rows:
            chunk = images[k * a.samples:(k + 1) * a.samples]
            cells += chunk + [blank] * (cols - len(chunk))
    grid_path = save_image_atomic(quality.image_grid(cells, cols, scale=4), Path(a.output_dir) / "demo_grid.png")

    print(f"\n{'model':<14}{'subject fidelity':>18}{'prompt fidelity':>17}")
    for name, subj, prompt in table:
        print(f"{name:<14}{subj:>18.0%}{prompt:>17.0%}")
    print(f"\ngrid: {grid_path}\n  row 1: the subject images; then per background ({', '.join(unseen)}): "
          f"a row from the base model, a row from base + LoRA (same seeds)")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0
