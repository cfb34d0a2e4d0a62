"""Does a toy base model's cross-attention look at the words of what is drawn where it is drawn?

In Stable Diffusion a word's cross-attention map lights up where that word is drawn (what Prompt-to-Prompt
edits), so an adapter trained on "a sks dog" mostly changes the pixels that attend to "sks". This bench measures
the same property on a toy base: it draws held-out captions, records each cross-attention layer's probabilities
(conditional half of classifier-free guidance, averaged over heads and sampling steps), and compares, for each
word, the mean attention it gets from pixels inside the shape as drawn (the probe's mask of the generated image)
with the mean from pixels outside.

    python bench/toy_attention.py                              # the committed data/toy/base
    python bench/toy_attention.py --base outputs/toy_base/pipeline   # e.g. trained with --grounding_loss_weight 0

Columns: in/out ratio of the shape's words (size, colour and shape name; above 1 = attended on the shape) and of
the background words (background colour and "background"; below 1 = attended off the shape): the words
`customize.toy.grounding.word_regions` grounds. Per cross-attention layer, geometric
mean over the prompts. 1.00 everywhere means the layer reads the prompt as one pooled vector.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from customize.bench import single_thread_unless_set
from customize.toy import experiments, probes, quality, world
from customize.toy.grounding import BACKGROUND, SHAPE, record_cross_attention, word_regions


def locality(pipe, n: int = 16, seed: int = 0) -> dict[str, tuple[float, float]]:
    """{layer: (shape words' in/out ratio, background words' in/out ratio)}, geometric means over n prompts."""
    prompts = world.heldout_prompts(n, seed)
    store: dict[str, list[torch.Tensor]] = {}
    before = record_cross_attention(pipe.unet, store)
    try:
        images = quality.sample(pipe, [p for p, _ in prompts], seeds=[seed + i for i in range(n)], batch_size=n)
    finally:
        pipe.unet.set_attn_processor(before)  # the pipeline's own processors again
    drawn = [r.mask for r in probes.read_all(images)]  # (32, 32) bool: the shape where the model put it
    out = {}
    for name, steps in store.items():
        # (n, N, L): the conditional half of each classifier-free-guidance batch, mean over sampling steps
        probs = torch.stack([step[step.shape[0] // 2:] for step in steps]).mean(0)
        side = int(math.isqrt(probs.shape[1]))
        shape_r, bg_r = [], []
        for i, (prompt, _) in enumerate(prompts):
            mask = drawn[i]
            if not mask.any():
                continue  # no shape drawn
            f = mask.shape[0] // side
            inside = torch.from_numpy(mask.reshape(side, f, side, f).mean(axis=(1, 3)) >= 0.5).flatten()  # (N,)
            if inside.all() or not inside.any():
                continue
            p = probs[i]  # (N, L)
            ratio = p[inside].mean(0) / p[~inside].mean(0)  # (L,)
            regions = word_regions(prompt, p.shape[1])  # (L,) the words the grounding loss would ground
            shape_r.append(float(ratio[regions == SHAPE].mean()))
            bg_r.append(float(ratio[regions == BACKGROUND].mean()))
        if shape_r:
            out[name.removesuffix(".processor")] = (float(np.exp(np.mean(np.log(shape_r)))),
                                                    float(np.exp(np.mean(np.log(bg_r)))))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(experiments.BASE_DIR))
    p.add_argument("--n", type=int, default=16, help="held-out captions drawn")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    single_thread_unless_set()
    pipe = experiments.load_base(Path(a.base))
    rows = locality(pipe, a.n, a.seed)
    print(f"{'cross-attention layer':<58}{'shape words':>12}{'background':>12}")
    for name, (fg, bg) in rows.items():
        print(f"{name:<58}{fg:>12.2f}{bg:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
