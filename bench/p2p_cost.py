"""Sampling cost of a Prompt-to-Prompt edit (source + target, word swap: customize.inference.edit with
Replace(0.8, 0.4)) against a plain `customize.inference.generate` of the same two prompts in one batch from the
same seed, measured in one run on the same pipeline (issue 18, acceptance 4: the edit <= 1.3x). The sampling call
is what is timed (no loading); each mode gets one warm-up call, then --rounds alternating rounds.

    OMP_NUM_THREADS=1 python bench/p2p_cost.py                    # the committed toy model, CPU, one thread
    python bench/p2p_cost.py -m stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --steps 50

The model defaults to the committed toy model (data/toy/base, SD layout at 32 px: the cross-attention layers
run at 8 x 8 and 4 x 4, so Replace's explicit probabilities cover every attention layer, self-attention
included). Prints the median seconds of each mode and the edit's ratio to generate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "a large red circle in the center on a blue background"
TARGET = "a large red square in the center on a blue background"


def main(argv=None) -> int:
    from customize.attention import Replace
    from customize.bench import single_thread_unless_set
    from customize.inference import edit, generate
    from customize.models import load_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=str(ROOT / "data" / "toy" / "base"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    single_thread_unless_set()
    pipe = load_pipeline(a.model).to(a.device)
    pipe.set_progress_bar_config(disable=True)

    def timed(fn):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    modes = {
        "generate": lambda: generate(pipe, [SOURCE, TARGET], [a.seed, a.seed], num_inference_steps=a.steps,
                                     batch_size=2),
        "edit": lambda: edit(pipe, SOURCE, TARGET, a.seed, Replace(0.8, 0.4), num_inference_steps=a.steps),
    }
    for fn in modes.values():
        timed(fn)  # warm-up
    times = {m: [] for m in modes}
    for _ in range(a.rounds):
        for m, fn in modes.items():
            times[m].append(timed(fn))
    base = statistics.median(times["generate"])
    print(f"{Path(a.model).name}: source + target ({SOURCE!r} -> {TARGET!r}), {a.steps} steps on {a.device}, "
          f"torch threads {torch.get_num_threads()}, median of {a.rounds} rounds")
    for m in modes:
        t = statistics.median(times[m])
        print(f"{m:9s} {t:7.3f} s   {t / base:5.2f}x generate   (rounds: {', '.join(f'{x:.3f}' for x in times[m])})")
    ratio = statistics.median(times["edit"]) / base
    print(f"edit / generate {ratio:.2f}x: target <= 1.3x {'met' if ratio <= 1.3 else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
