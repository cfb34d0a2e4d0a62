"""Does the toy DreamBooth-LoRA subject leave its instance backgrounds? A few variants of the LoRA run, each
scored on the backgrounds the 5 subject images showed (white, black, yellow) and on the ones they never showed,
with and without prior preservation, for one or several training seeds.

    python bench/toy_background_study.py                    # every variant (about 10 minutes, 1 thread)
    python bench/toy_background_study.py --variants defaults,prior-all-backgrounds
    python bench/toy_background_study.py --variants defaults --train_seeds 0-7   # how much a run varies

Columns (shares of generated images, probe-read, 16 sampling seeds per background):
  seen subject    subject drawn for "a sks shape on a <bg> background", bg in the instance backgrounds
  unseen subject  the same for the other backgrounds; unseen prompt: the background asked for is drawn
  class subject   the subject drawn for the class prompt "a shape on a white background" (the identifier unused)
The figure that matters is unseen subject and unseen prompt together (both >= 70% wanted; results in
docs/findings.md, 'The subject on unseen backgrounds'). Under each row, per background (* = an instance
background): images showing the subject on the background asked for. With several training seeds, one row per
seed and their mean.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from customize.bench import pick, single_thread_unless_set
from customize.toy import experiments, probes, quality, world

ALL = world.BASE_COLOURS
SEEN = world.SUBJECT.instance_backgrounds
# name: (options of experiments.dreambooth_lora)
VARIANTS = {
    "defaults": {},
    "prior-all-backgrounds": {"with_prior": True, "class_backgrounds": ALL},
    "prior-seen-backgrounds": {"with_prior": True, "class_backgrounds": SEEN},
    "all-linear": {"lora_target": "all-linear", "max_train_steps": 1000},
    "all-linear+prior-all-backgrounds": {"lora_target": "all-linear", "max_train_steps": 1000, "with_prior": True,
                                         "class_backgrounds": ALL},
}


def score(pipe, seeds_per_prompt: int = 16, seed: int = 0) -> dict:
    """The columns above, plus "per background": {bg: (images with the subject on the background asked for,
    images)} for every background, seen or not."""
    cases = [(world.SUBJECT.prompt(bg), bg) for bg in ALL for _ in range(seeds_per_prompt)]
    cases += [(f"{world.SUBJECT.class_prompt} on a white background", None)] * 16
    images = quality.sample(pipe, [prompt for prompt, _ in cases], seeds=[seed + i for i in range(len(cases))])
    rows = [(quality.shows_subject(r), r.background == bg, bg) for r, (_, bg) in zip(probes.read_all(images), cases)]

    def share(keep, column):
        cells = [row[column] for row in rows if keep(row[2])]
        return sum(cells) / len(cells)

    unseen = lambda bg: bg is not None and bg not in SEEN  # noqa: E731
    both = {bg: (sum(s and b for s, b, g in rows if g == bg), sum(g == bg for *_, g in rows)) for bg in ALL}
    return {"seen subject": share(lambda bg: bg in SEEN, 0), "unseen subject": share(unseen, 0),
            "unseen prompt": share(unseen, 1), "class subject": share(lambda bg: bg is None, 0),
            "per background": both}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--output_dir", default="outputs/bench-toy-background-study")
    p.add_argument("--base", default=str(experiments.BASE_DIR),
                   help="toy base model folder (default: the committed one; e.g. one trained with "
                        "recipes/train_toy_base.py --grounding_loss_weight 0)")
    p.add_argument("--train_seeds", default="0", type=seed_list,
                   help="training seeds, e.g. 0 or 0,3 or 0-7 (sampling seeds stay the same)")
    p.add_argument("--seeds_per_prompt", type=int, default=16, help="images per background")
    a = p.parse_args(argv)
    names = pick(a.variants, VARIANTS, "variant")
    single_thread_unless_set()
    columns = ("seen subject", "unseen subject", "unseen prompt", "class subject")
    print(f"{'variant':<34}{'seed':>5}" + "".join(f"{c:>16}" for c in columns) + f"{'train s':>9}")
    for name in names:
        rows = []
        for seed in a.train_seeds:
            start = time.perf_counter()
            run = experiments.dreambooth_lora(Path(a.output_dir) / f"{name}-seed{seed}", base=a.base, seed=seed,
                                              **VARIANTS[name])
            scores = score(run.pipe, a.seeds_per_prompt)
            rows.append(scores)
            print(f"{name:<34}{seed:>5}" + "".join(f"{scores[c]:>16.0%}" for c in columns) + f"{run.seconds:>9.0f}",
                  flush=True)
            cells = (f"{bg}{'*' if bg in SEEN else ''} {k}/{n}" for bg, (k, n) in scores["per background"].items())
            print(f"{'':<4}subject on the background asked for: " + ", ".join(cells), flush=True)
            print(f"[{name}, seed {seed}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
        if len(rows) > 1:
            print(f"{name:<34}{'mean':>5}" + "".join(f"{sum(r[c] for r in rows) / len(rows):>16.0%}" for c in columns)
                  + "\n" + f"{'':<4}unseen subject, lowest seed: {min(r['unseen subject'] for r in rows):.0%}", flush=True)
    return 0


def seed_list(text: str) -> list[int]:
    """'0' -> [0]; '0,3' -> [0, 3]; '0-7' -> [0, ..., 7]."""
    seeds = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a seed list: {text!r} (use e.g. 0 or 0,3 or 0-7)") from None
    return seeds


if __name__ == "__main__":
    sys.exit(main())
