"""Does a toy base follow the position phrase of its prompt ("at the top left"), and if not, where is it lost?

Three measures, each a function of (model, prompts, seeds) only:

1. Prompt accuracy per attribute on held-out full captions (`customize.toy.quality.base_accuracy`: colour, shape,
   background, size, position), with how often each position was asked and how often it was drawn. A base that
   ignores the phrase draws every position at about the same rate whatever it is asked (chance: 20%).
2. Position sensitivity of the model's own guess of the image. With zero terminal SNR, x_T holds nothing of the
   image, so the layout must come from the prompt in the first, noisiest steps. For noise x_t = sqrt(1 - ab_t) eps
   (an empty image) and t from T down, x0_hat = sqrt(ab_t) x_t - sqrt(1 - ab_t) v_hat is computed for one caption
   with each of the 5 position phrases and for the same caption with another shape colour. "position" is the RMS
   spread of x0_hat over the 5 positions, "colour" the RMS change of a colour swap / sqrt(2), and the ratio
   compares them: moving a shape changes about twice the pixels a recolouring does, so a base that places shapes
   by the phrase has a ratio near 1 or above, one that ignores it near 0.
3. Where x0_hat at t = T puts the shape: the redness of the decoded x0_hat for "a large red circle <position> on a
   blue background", averaged over 32 noises, pooled to 2x2 quadrants (top left, top right / bottom left, bottom
   right); the asked quadrant should be the reddest.

    python bench/toy_position.py                                  # the committed data/toy/base
    python bench/toy_position.py --base outputs/toy_base/pipeline --n 200
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from customize.bench import single_thread_unless_set
from customize.toy import experiments, quality, world

SENSITIVITY_TIMESTEPS = (999, 900, 800, 700, 600, 400)


def _embed(pipe, texts):
    from customize.training import sd

    return sd.encode_prompts(pipe, texts)["encoder_hidden_states"]  # (B, L, D)


@torch.no_grad()
def _x0_hat(pipe, x_t, t: int, emb):
    ab = pipe.scheduler.alphas_cumprod[t].to(x_t)
    out = pipe.unet(x_t, t, encoder_hidden_states=emb.expand(x_t.shape[0], -1, -1)).sample
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return ab.sqrt() * x_t - (1 - ab).sqrt() * out
    return (x_t - (1 - ab).sqrt() * out) / ab.sqrt().clamp_min(1e-4)  # epsilon


@torch.no_grad()
def sensitivity(pipe, n_noise: int = 16, seed: int = 0) -> list[tuple[int, float, float]]:
    """[(t, position spread, colour change)] as in the module docstring."""
    size = pipe.unet.config.sample_size
    noise = torch.randn(n_noise, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    phrases = list(world.POSITION_PHRASES.values())
    embs = [_embed(pipe, [f"a large red circle {p} on a blue background"]) for p in phrases]
    other = _embed(pipe, [f"a large green circle {phrases[0]} on a blue background"])
    rows = []
    for t in SENSITIVITY_TIMESTEPS:
        x_t = (1 - pipe.scheduler.alphas_cumprod[t]).sqrt() * noise
        preds = torch.stack([_x0_hat(pipe, x_t, t, e) for e in embs])  # (5, n, C, h, w)
        spread = float((preds - preds.mean(0)).pow(2).mean().sqrt())
        colour = float((_x0_hat(pipe, x_t, t, other) - preds[0]).pow(2).mean().sqrt()) / 2 ** 0.5
        rows.append((t, spread, colour))
    return rows


@torch.no_grad()
def first_guess_quadrants(pipe, n_noise: int = 32, seed: int = 0) -> dict[str, list[float]]:
    """{position: [redness of the 4 quadrants: TL, TR, BL, BR]} of the decoded x0_hat at t = T."""
    size = pipe.unet.config.sample_size
    noise = torch.randn(n_noise, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    t = int(pipe.scheduler.config.num_train_timesteps) - 1
    x_t = (1 - pipe.scheduler.alphas_cumprod[t]).sqrt() * noise
    red = torch.tensor(world.PALETTE["red"], dtype=torch.float32) / 127.5 - 1
    out = {}
    for name, phrase in world.POSITION_PHRASES.items():
        x0 = _x0_hat(pipe, x_t, t, _embed(pipe, [f"a large red circle {phrase} on a blue background"]))
        image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample.float().cpu()  # (n, 3, H, W)
        redness = -(image - red[None, :, None, None]).pow(2).sum(1).mean(0)  # (H, W)
        q = torch.nn.functional.avg_pool2d(redness[None, None], redness.shape[-1] // 2)[0, 0]  # (2, 2)
        out[name] = [round(float(v), 2) for v in q.flatten()]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=experiments.BASE_DIR, help="toy pipeline folder")
    parser.add_argument("--n", type=int, default=100, help="held-out captions scored (each names a position)")
    parser.add_argument("--seed", type=int, default=5, help="seed of the captions and sampling seeds")
    args = parser.parse_args(argv)
    single_thread_unless_set()
    pipe = experiments.load_base(args.base)

    scored = quality.base_accuracy(pipe, n=args.n, seed=args.seed)
    print("accuracy:", ", ".join(f"{k} {100 * v:.0f}%" for k, v in scored.scores.items()))
    asked = Counter(world.parse_caption(p)["position"] for p, _ in world.heldout_prompts(args.n, args.seed))
    drawn = Counter(r.position for r in scored.readings)
    print("position: asked / drawn:", ", ".join(f"{p} {asked[p]}/{drawn[p]}" for p in world.POSITIONS))

    print("\n| t | x0_hat spread over positions | colour swap | ratio |\n|---|---|---|---|")
    for t, spread, colour in sensitivity(pipe):
        print(f"| {t} | {spread:.4f} | {colour:.4f} | {spread / colour:.3f} |")

    print("\nredness of x0_hat at t = T by quadrant (TL, TR, BL, BR; higher = redder):")
    for name, q in first_guess_quadrants(pipe).items():
        print(f"  {name:12s} {q}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
