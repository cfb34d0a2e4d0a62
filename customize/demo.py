"""`customize demo`: the README's main job.

`customize demo toy` runs the toy-world demo (a LoRA learns a new subject on the tiny committed Stable Diffusion
model, then draws it and scores it with the world's probes) when that model is in the checkout.
`customize demo digits` trains the from-scratch DDPM core (customize.core) on scikit-learn's digits through the
shared engine, draws a 10x10 grid with DDIM and scores it with a digit classifier fitted on the real digits.
With no name, the toy demo runs if it is available and the digits demo otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path


def toy_available() -> bool:
    if importlib.util.find_spec("customize.toy.demo") is None:
        return False
    from customize.toy import demo as toy_demo

    return bool(getattr(toy_demo, "available", lambda: True)())


def digit_classifier(subset=None):
    """Logistic regression on the 1,797 real 8x8 digits (scikit-learn), or on the rows `subset` of them: the judge
    of generated samples. It takes digits flattened to 64 features and divided by 16."""
    from sklearn.linear_model import LogisticRegression

    from customize.data.folder import load_digits_array

    images, labels = load_digits_array()
    features = images.reshape(len(images), -1) / 16  # (1797, 64)
    if subset is not None:
        features, labels = features[subset], labels[subset]
    # Pixels scaled to [0, 1] (the data set's range is 0..16): lbfgs then converges in a second, not twenty.
    return LogisticRegression(C=10.0, max_iter=5000).fit(features, labels)


def digits_demo(argv: list[str]) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from customize.data.folder import unit_to_digits
    from customize.methods.ddpm import DDPM, DDPMConfig, build_dataset, build_model, load_ddpm, sample_images
    from customize.training import train

    p = argparse.ArgumentParser(prog="customize demo digits", description=digits_demo.__doc__)
    p.add_argument("--steps", type=int, default=800, help="training steps (batch 64); ~1,000 gives real digits")
    p.add_argument("--output_dir", default="outputs/demo-digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample_steps", type=int, default=25, help="DDIM steps for the 100 samples (25 scored best on the digits)")
    a = p.parse_args(argv)

    import os

    if "OMP_NUM_THREADS" not in os.environ:
        # A 1 M-parameter UNet on 8x8 images is too small to split across threads: one thread is as fast on an
        # idle machine and many times faster on a busy one (measured 1.8 vs 0.1 steps/s on a loaded 2-core box).
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = DDPMConfig(dataset_name="digits", class_conditional=True, output_dir=a.output_dir, seed=a.seed,
                     max_train_steps=a.steps, checkpointing_steps=0, validation_steps=0, report_to="none")
    dataset = build_dataset(cfg)
    model = build_model(cfg, channels=dataset.channels, classes=dataset.classes)
    print(f"training a {sum(p.numel() for p in model.unet.parameters()) / 1e6:.2f} M-parameter class-conditional "
          f"DDPM (customize.core) on {len(dataset)} digits for {a.steps} steps")
    train(DDPM(), model, dataset, cfg)
    model = load_ddpm(a.output_dir)  # the saved EMA weights (the engine trains raw weights, saves the average)
    model.unet.eval()
    with torch.no_grad():
        x = sample_images(model, 100, num_inference_steps=a.sample_steps, class_labels=torch.arange(100) % 10)
    digits = unit_to_digits(x)[:, 0].numpy()  # (100, 8, 8) in [0, 16]
    proba = digit_classifier().predict_proba(digits.reshape(100, -1) / 16)
    asked = np.arange(100) % 10
    confidence = float(proba.max(1).mean())
    right = float((proba.argmax(1) == asked).mean())

    grid = (digits.reshape(10, 10, 8, 8).transpose(0, 2, 1, 3).reshape(80, 80) / 16 * 255).astype(np.uint8)
    out = Path(a.output_dir) / "digits_grid.png"
    from customize.data.images import save_image_atomic

    save_image_atomic(Image.fromarray(grid).resize((400, 400), Image.NEAREST), out)
    print(f"classifier confidence {confidence:.3f} (mean max-probability), asked-for class drawn {right:.0%}")
    print(f"grid (one column per class 0-9): {out}   total {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name = argv.pop(0) if argv and not argv[0].startswith("-") else ("toy" if toy_available() else "digits")
    if name == "toy":
        if not toy_available():
            print("customize: the toy-world demo needs the toy model in data/toy/base; try `customize demo digits`")
            return 1
        from customize.toy import demo as toy_demo

        return int(toy_demo.main(argv) or 0)
    if name == "digits":
        return digits_demo(argv)
    print(f"customize: unknown demo {name!r}; choose toy or digits")
    return 1
